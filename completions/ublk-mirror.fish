# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_ublk_mirror_global_optspecs
    string join \n h/help V/version
end

function __fish_ublk_mirror_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_ublk_mirror_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_ublk_mirror_using_subcommand
    set -l cmd (__fish_ublk_mirror_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -s V -l version -d 'Print version'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, elvish, powershell) to standard output'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "man" -d 'Print the man page (roff) to standard output; --conf: the config file\'s page'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "sync" -d 'Bring TARGET in step with SOURCE offline, copying what the bitmap marks dirty (everything, for a new bitmap)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "verify" -d 'Compare SOURCE and TARGET region by region (offline; with --bitmap, also check that every differing region is marked dirty), or a live device\'s pair with -n ID (online: dirty and busy regions are skipped)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "bitmap" -d 'Inspect a bitmap file'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "add" -d 'Create /dev/ublkbN over SOURCE, mirrored to TARGET; prints the device as JSON once live'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "up" -d 'Make the device named by --name serve: recover it if its daemon died, nothing if it is live, add it otherwise (for service managers: see the systemd unit)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "down" -d 'Delete the device with this name, if it exists'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "udev-name" -d 'For udev: print the name of the device with kernel name KERNEL (ublkbN)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "udev-source" -d 'For udev: print the configured mirror whose SOURCE is the block device KERNEL (or one of its LINKS, relative to /dev); exit 1 if none'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "del" -d 'Stop and delete a device (the bitmap keeps what is still dirty)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "list" -d 'List the ublk-mirror devices'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "recover" -d 'Start a new daemon for a device whose daemon died (the device waits for it, QUIESCED)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "status" -d 'State of a device\'s mirror: syncing or synced, dirty bytes, copy progress, consistent points'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "metrics" -d 'Print every device\'s state in the Prometheus text format (for node_exporter\'s textfile collector): state, dirty bytes, lag, copy rate, consistent points, target failures, bytes copied. A device whose daemon does not answer is ublk_mirror_up 0 (and named on standard error); the exit status is 0 unless the devices cannot be listed at all'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "set" -d 'Change a running mirror\'s settings: copy speed, copy mode, max lag, retries'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "switchover" -d 'Move the device onto its target for good (live storage migration): once synced, hold writes for a moment, copy the last dirty regions, make them durable, and serve the target from then on. The bitmap records it, so the old pair cannot be served again'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "pause" -d 'Stop copying (the device keeps serving I/O; writes are tracked in the bitmap)'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "resume" -d 'Resume copying after `pause`'
complete -c ublk-mirror -n "__fish_ublk_mirror_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand completions" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand man" -l conf
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand man" -l conf-example -d 'The example config file instead'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand man" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -s s -l source -d 'Source file or block device (read only)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -s t -l target -d 'Target, at least as large as the source: a file, a block device or an NBD URI (as for add)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -s b -l bitmap -d 'Dirty bitmap file; created (with a full sync) if absent' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -s g -l granularity -d 'Region size for a new bitmap: a power of two from 4K to 64M [default: 64K up to 4 TiB, doubled above until the bitmap has at most 64 Mi regions]' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l direct -d 'O_DIRECT use: auto falls back to buffered I/O where the filesystem refuses it (tmpfs)' -r -f -a "auto\t'O_DIRECT, or buffered I/O with a warning where the filesystem refuses it (tmpfs)'
always\t'O_DIRECT or an error'
never\t'Buffered I/O through the page cache (flushes still make data durable)'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l copies -d 'Copies in flight' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l buffer -d 'Size of each copy buffer (memory used: copies x buffer)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l checkpoint-bytes -d 'Make progress durable (target flush, bitmap update) after this much data...' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l checkpoint-secs -d '...or this many seconds, so an interrupted sync resumes near where it stopped' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l tls-ca -d 'nbds target: the CA certificate(s), PEM, that signed the server\'s certificate [default: the system\'s trust store]' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l tls-cert -d 'nbds target: this client\'s certificate, PEM, for a server that asks for one (mutual TLS)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l tls-key -d 'nbds target: the private key of --tls-cert, PEM; refused if other users may read it' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l full -d 'Copy everything, rebuilding the bitmap (whatever it held)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l assume-synced -d 'Declare source and target identical: clear the bitmap, copy nothing'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -l json -d 'Print the summary as JSON'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand sync" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -s n -l number -d 'Verify a live device instead (online: dirty and busy regions are skipped; throttled like the copy)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -s s -l source -d 'Source file or block device' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -s t -l target -d 'Target: a file, a block device or an NBD URI (as for add)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -s b -l bitmap -d 'The pair\'s bitmap: differing regions whose bit is clear are reported as a bug' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -s g -l granularity -d 'Region size for the report without a bitmap [default: 64K]' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -l direct -d 'O_DIRECT use, as for sync' -r -f -a "auto\t'O_DIRECT, or buffered I/O with a warning where the filesystem refuses it (tmpfs)'
always\t'O_DIRECT or an error'
never\t'Buffered I/O through the page cache (flushes still make data durable)'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -l tls-ca -d 'nbds target: the CA certificate(s), PEM, that signed the server\'s certificate [default: the system\'s trust store]' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -l tls-cert -d 'nbds target: this client\'s certificate, PEM, for a server that asks for one (mutual TLS)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -l tls-key -d 'nbds target: the private key of --tls-cert, PEM; refused if other users may read it' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -l json -d 'Print the report as JSON'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand verify" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and not __fish_seen_subcommand_from show help" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and not __fish_seen_subcommand_from show help" -f -a "show" -d 'Header fields, dirty regions and bytes'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and not __fish_seen_subcommand_from show help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and __fish_seen_subcommand_from show" -l json -d 'Print JSON'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "show" -d 'Header fields, dirty regions and bytes'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s s -l source -d 'Source file or block device: the device\'s data lives here' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s t -l target -d 'Target, at least as large as the source: a file, a block device, or an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH; nbds:// and nbds+unix:// over TLS, see --tls-ca)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s b -l bitmap -d 'Dirty bitmap file (created if absent)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l sync -d 'Initial sync: full (default for a new bitmap), none (declare the pair identical), resume (default for an existing bitmap: copy only what it marks dirty)' -r -f -a "full\t'Copy everything: a new bitmap with every bit set, durable before the first copy, so an interrupted initial sync resumes where it stopped'
none\t'The user declares source and target identical: a new bitmap with every bit clear'
resume\t'Use the bitmap as found: copy only what it says is dirty'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s g -l granularity -d 'Region size for a new bitmap [default: 64K up to 4 TiB, doubled above until the bitmap has at most 64 Mi regions]' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l name -d 'Stable name: /dev/disk/by-ublk-mirror/NAME (with the udev rules), and what `up` and `down` take [default: the source\'s file name]' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s n -l number -d 'Device id (N of /dev/ublkbN); default: the first free one' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s q -l queues -d 'Queues' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s d -l depth -d 'Queue depth' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l affinity -d 'single: each queue thread runs on one CPU of its queue\'s set, with the io_uring workers that do its file I/O (rublk\'s and ublksrv\'s default); all: they float over the set, which lets a write-blocking mirror\'s two writes use two CPUs at once' -r -f -a "single\t'Each queue thread pinned to one CPU of its queue\'s set, as rublk and ublksrv do by default. Its io_uring workers (which run I/O the file system cannot start without blocking) inherit the pin, so they share that CPU with it: requests are handed over without waking another CPU'
all\t'Queue threads and their workers float over the queue\'s CPUs: a write-blocking mirror\'s two writes (source and target) can then use two CPUs at once'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l direct -d 'O_DIRECT use: auto falls back to buffered I/O where the filesystem refuses it (tmpfs)' -r -f -a "auto\t'O_DIRECT, or buffered I/O with a warning where the filesystem refuses it (tmpfs)'
always\t'O_DIRECT or an error'
never\t'Buffered I/O through the page cache (flushes still make data durable)'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l copies -d 'Copies in flight' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l buffer -d 'Size of each copy buffer (memory used: copies x buffer)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l checkpoint-bytes -d 'Make progress durable (target flush, bitmap update) after this much data...' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l checkpoint-secs -d '...or this many seconds, so an interrupted sync resumes near where it stopped' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l tls-ca -d 'nbds target: the CA certificate(s), PEM, that signed the server\'s certificate [default: the system\'s trust store]' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l tls-cert -d 'nbds target: this client\'s certificate, PEM, for a server that asks for one (mutual TLS)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l tls-key -d 'nbds target: the private key of --tls-cert, PEM; refused if other users may read it' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l speed -d 'Copy bandwidth limit in bytes per second (K/M/G suffixes; 0 = unlimited); `set` changes it' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l busy-speed -d 'While applications use the device (at least 128 requests/s) the background copy yields: it runs at most this fast (K/M/G suffixes), like md\'s speed_limit_min or DRBD\'s c-min-rate; at full --speed otherwise. 0 = never yield (the copy competes with applications for CPU and disk). `set` changes it' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l mode -d 'background: writes complete on the source and the mirror copies behind them; write-blocking: writes complete once on source and target (file and block device targets); async: writes complete once on the source and in a replication buffer, and are shipped to the target in order of the device\'s flushes, so the target is a crash image of the source at every consistent point (DRBD\'s protocol A); behind (buffer full, target failing) it falls back to background and resumes once caught up' -r -f -a "background\t'Writes complete once on the source; the mirror copies dirty regions behind them'
write-blocking\t'Writes complete once on the source and the target (QEMU\'s write-blocking active mirror): regions written stay clean, the dirty set only drains'
async\t'Writes complete once on the source and in the replication buffer; the mirror ships them to the target in order, one flush epoch at a time (DRBD\'s protocol A), and falls back to the background copy when the buffer is full or the target fails'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l async-buffer -d 'Async mode\'s replication buffer: memory for the writes not yet on the target (K/M/G suffixes, 4M to 16G). `set` changes it' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l max-lag -d 'Switch to write-blocking while the target has been behind for longer than this (e.g. 30s, 5m), back to background once synced' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l max-retries -d 'Stop mirroring after this many failed retries in a row (0 = retry for ever, with backoff)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l event-log -d 'Event log (JSON lines) [default: /run/ublk-mirror/ID.events]' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l on-consistent -d 'Run this shell command after a consistent point (at most once per --on-consistent-interval), with the target left untouched until it exits: to snapshot the replica. Environment: UBLK_MIRROR_CONSISTENT_SEQ, UBLK_MIRROR_CONSISTENT_TIME_MS, UBLK_MIRROR_DEVICE, UBLK_MIRROR_SOURCE, UBLK_MIRROR_TARGET' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l on-consistent-interval -d 'Least time between two --on-consistent runs' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l on-consistent-timeout -d 'Kill an --on-consistent command still running after this long' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -l foreground -d 'Serve in this process instead of a daemon'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand add" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s s -l source -d 'Source file or block device: the device\'s data lives here' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s t -l target -d 'Target, at least as large as the source: a file, a block device, or an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH; nbds:// and nbds+unix:// over TLS, see --tls-ca)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s b -l bitmap -d 'Dirty bitmap file (created if absent)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l sync -d 'Initial sync: full (default for a new bitmap), none (declare the pair identical), resume (default for an existing bitmap: copy only what it marks dirty)' -r -f -a "full\t'Copy everything: a new bitmap with every bit set, durable before the first copy, so an interrupted initial sync resumes where it stopped'
none\t'The user declares source and target identical: a new bitmap with every bit clear'
resume\t'Use the bitmap as found: copy only what it says is dirty'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s g -l granularity -d 'Region size for a new bitmap [default: 64K up to 4 TiB, doubled above until the bitmap has at most 64 Mi regions]' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l name -d 'Stable name: /dev/disk/by-ublk-mirror/NAME (with the udev rules), and what `up` and `down` take [default: the source\'s file name]' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s n -l number -d 'Device id (N of /dev/ublkbN); default: the first free one' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s q -l queues -d 'Queues' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s d -l depth -d 'Queue depth' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l affinity -d 'single: each queue thread runs on one CPU of its queue\'s set, with the io_uring workers that do its file I/O (rublk\'s and ublksrv\'s default); all: they float over the set, which lets a write-blocking mirror\'s two writes use two CPUs at once' -r -f -a "single\t'Each queue thread pinned to one CPU of its queue\'s set, as rublk and ublksrv do by default. Its io_uring workers (which run I/O the file system cannot start without blocking) inherit the pin, so they share that CPU with it: requests are handed over without waking another CPU'
all\t'Queue threads and their workers float over the queue\'s CPUs: a write-blocking mirror\'s two writes (source and target) can then use two CPUs at once'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l direct -d 'O_DIRECT use: auto falls back to buffered I/O where the filesystem refuses it (tmpfs)' -r -f -a "auto\t'O_DIRECT, or buffered I/O with a warning where the filesystem refuses it (tmpfs)'
always\t'O_DIRECT or an error'
never\t'Buffered I/O through the page cache (flushes still make data durable)'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l copies -d 'Copies in flight' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l buffer -d 'Size of each copy buffer (memory used: copies x buffer)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l checkpoint-bytes -d 'Make progress durable (target flush, bitmap update) after this much data...' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l checkpoint-secs -d '...or this many seconds, so an interrupted sync resumes near where it stopped' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l tls-ca -d 'nbds target: the CA certificate(s), PEM, that signed the server\'s certificate [default: the system\'s trust store]' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l tls-cert -d 'nbds target: this client\'s certificate, PEM, for a server that asks for one (mutual TLS)' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l tls-key -d 'nbds target: the private key of --tls-cert, PEM; refused if other users may read it' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l speed -d 'Copy bandwidth limit in bytes per second (K/M/G suffixes; 0 = unlimited); `set` changes it' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l busy-speed -d 'While applications use the device (at least 128 requests/s) the background copy yields: it runs at most this fast (K/M/G suffixes), like md\'s speed_limit_min or DRBD\'s c-min-rate; at full --speed otherwise. 0 = never yield (the copy competes with applications for CPU and disk). `set` changes it' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l mode -d 'background: writes complete on the source and the mirror copies behind them; write-blocking: writes complete once on source and target (file and block device targets); async: writes complete once on the source and in a replication buffer, and are shipped to the target in order of the device\'s flushes, so the target is a crash image of the source at every consistent point (DRBD\'s protocol A); behind (buffer full, target failing) it falls back to background and resumes once caught up' -r -f -a "background\t'Writes complete once on the source; the mirror copies dirty regions behind them'
write-blocking\t'Writes complete once on the source and the target (QEMU\'s write-blocking active mirror): regions written stay clean, the dirty set only drains'
async\t'Writes complete once on the source and in the replication buffer; the mirror ships them to the target in order, one flush epoch at a time (DRBD\'s protocol A), and falls back to the background copy when the buffer is full or the target fails'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l async-buffer -d 'Async mode\'s replication buffer: memory for the writes not yet on the target (K/M/G suffixes, 4M to 16G). `set` changes it' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l max-lag -d 'Switch to write-blocking while the target has been behind for longer than this (e.g. 30s, 5m), back to background once synced' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l max-retries -d 'Stop mirroring after this many failed retries in a row (0 = retry for ever, with backoff)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l event-log -d 'Event log (JSON lines) [default: /run/ublk-mirror/ID.events]' -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l on-consistent -d 'Run this shell command after a consistent point (at most once per --on-consistent-interval), with the target left untouched until it exits: to snapshot the replica. Environment: UBLK_MIRROR_CONSISTENT_SEQ, UBLK_MIRROR_CONSISTENT_TIME_MS, UBLK_MIRROR_DEVICE, UBLK_MIRROR_SOURCE, UBLK_MIRROR_TARGET' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l on-consistent-interval -d 'Least time between two --on-consistent runs' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l on-consistent-timeout -d 'Kill an --on-consistent command still running after this long' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -l foreground -d 'Serve in this process instead of a daemon'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand up" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand down" -l name -d 'The device\'s name' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand down" -l timeout -d 'Seconds to wait for --wait-synced' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand down" -l wait-synced -d 'First wait (at most --timeout seconds) for a consistent point'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand down" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand udev-name" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand udev-source" -l config-dir -r -F
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand udev-source" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand del" -s n -l number -d 'Device id (N of /dev/ublkbN)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand del" -l timeout -d 'Seconds to wait for --wait-synced' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand del" -l wait-synced -d 'First wait (at most --timeout seconds) for a consistent point'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand del" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand list" -l json -d 'Print JSON'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand list" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand recover" -s n -l number -d 'Device id' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand recover" -l foreground -d 'Serve in this process instead of a daemon'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand recover" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -s n -l number -d 'Device id' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -l timeout -d 'Seconds to wait for --wait-synced' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -l interval -d 'Seconds between two looks with --watch (0.1 to 3600; fractions allowed)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -l json -d 'Print JSON'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -l wait-synced -d 'Wait (at most --timeout seconds) for a consistent point; exit 0 once synced'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -l watch -d 'Keep showing the status (a progress bar on a terminal, a line a second otherwise) until interrupted, or until synced with --wait-synced'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand status" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand metrics" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -s n -l number -d 'Device id' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -l speed -d 'Copy bandwidth limit in bytes per second (K/M/G suffixes; 0 = unlimited)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -l busy-speed -d 'Copy bandwidth limit while the device serves I/O (0 = none: the copy competes with applications)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -l mode -d 'background; write-blocking (writes complete once on source and target); async (writes complete once on the source and in the replication buffer, shipped to the target in order)' -r -f -a "background\t'Writes complete once on the source; the mirror copies dirty regions behind them'
write-blocking\t'Writes complete once on the source and the target (QEMU\'s write-blocking active mirror): regions written stay clean, the dirty set only drains'
async\t'Writes complete once on the source and in the replication buffer; the mirror ships them to the target in order, one flush epoch at a time (DRBD\'s protocol A), and falls back to the background copy when the buffer is full or the target fails'"
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -l async-buffer -d 'Async mode\'s replication buffer (K/M/G suffixes, 4M to 16G)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -l max-lag -d 'Switch to write-blocking while the target has been behind for longer than this (e.g. 30s, 5m; 0 = never)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -l max-retries -d 'Stop mirroring after this many failed retries in a row (0 = retry for ever)' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand set" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand switchover" -s n -l number -d 'Device id' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand switchover" -l timeout -d 'Give up (and let writes resume on the source) if the target has not caught up within this many seconds' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand switchover" -l reverse -d 'Keep mirroring the other way: the old source becomes the target (it must have the target\'s size). Without it the old source is released'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand switchover" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand pause" -s n -l number -d 'Device id' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand pause" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand resume" -s n -l number -d 'Device id' -r
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand resume" -s h -l help -d 'Print help'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, elvish, powershell) to standard output'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "man" -d 'Print the man page (roff) to standard output; --conf: the config file\'s page'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "sync" -d 'Bring TARGET in step with SOURCE offline, copying what the bitmap marks dirty (everything, for a new bitmap)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "verify" -d 'Compare SOURCE and TARGET region by region (offline; with --bitmap, also check that every differing region is marked dirty), or a live device\'s pair with -n ID (online: dirty and busy regions are skipped)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "bitmap" -d 'Inspect a bitmap file'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "add" -d 'Create /dev/ublkbN over SOURCE, mirrored to TARGET; prints the device as JSON once live'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "up" -d 'Make the device named by --name serve: recover it if its daemon died, nothing if it is live, add it otherwise (for service managers: see the systemd unit)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "down" -d 'Delete the device with this name, if it exists'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "udev-name" -d 'For udev: print the name of the device with kernel name KERNEL (ublkbN)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "udev-source" -d 'For udev: print the configured mirror whose SOURCE is the block device KERNEL (or one of its LINKS, relative to /dev); exit 1 if none'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "del" -d 'Stop and delete a device (the bitmap keeps what is still dirty)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "list" -d 'List the ublk-mirror devices'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "recover" -d 'Start a new daemon for a device whose daemon died (the device waits for it, QUIESCED)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "status" -d 'State of a device\'s mirror: syncing or synced, dirty bytes, copy progress, consistent points'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "metrics" -d 'Print every device\'s state in the Prometheus text format (for node_exporter\'s textfile collector): state, dirty bytes, lag, copy rate, consistent points, target failures, bytes copied. A device whose daemon does not answer is ublk_mirror_up 0 (and named on standard error); the exit status is 0 unless the devices cannot be listed at all'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "set" -d 'Change a running mirror\'s settings: copy speed, copy mode, max lag, retries'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "switchover" -d 'Move the device onto its target for good (live storage migration): once synced, hold writes for a moment, copy the last dirty regions, make them durable, and serve the target from then on. The bitmap records it, so the old pair cannot be served again'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "pause" -d 'Stop copying (the device keeps serving I/O; writes are tracked in the bitmap)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "resume" -d 'Resume copying after `pause`'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and not __fish_seen_subcommand_from completions man sync verify bitmap add up down udev-name udev-source del list recover status metrics set switchover pause resume help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c ublk-mirror -n "__fish_ublk_mirror_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "show" -d 'Header fields, dirty regions and bytes'
