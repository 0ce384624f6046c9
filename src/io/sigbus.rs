//! Surviving a mapped bitmap file that shrinks under the daemon.
//!
//! The bitmap is a shared mapping of a file. If another process truncates that file (a mistaken
//! `truncate`, `> file`, a tool rewriting it) or its pages cannot be read back from a failing
//! disk, the next access to a page past the new end of the file raises SIGBUS, whose default
//! action kills the daemon, and with it every application using the device.
//!
//! [`watch`] registers a mapping. A SIGBUS whose fault address lies in a registered mapping is
//! answered by mapping a private zero page over the faulting page (the access then completes on
//! memory that no longer reaches the file) and by raising the mapping's "lost" flag; any other
//! SIGBUS goes to the handler that was installed before (Rust's own, or the default action:
//! death, as without this module). The owner of the mapping polls [`Watch::lost`] and stops
//! trusting the file: what it writes to those pages reaches nothing durable.
//!
//! The handler only reads atomics and makes one `mmap` system call, both safe in a signal
//! handler (mmap is a plain system call; it is not in POSIX's list of async-signal-safe
//! functions, but Linux's implementation takes no lock a user-space thread could hold).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings watched at once (a daemon has one bitmap, tests a few at a time).
const SLOTS: usize = 64;

struct Slot {
    /// Taken by a [`Watch`].
    used: AtomicBool,
    start: AtomicUsize,
    /// 0 while the slot is being filled or emptied: the handler skips it.
    len: AtomicUsize,
    lost: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only as the array's initializer
const EMPTY: Slot = Slot { used: AtomicBool::new(false), start: AtomicUsize::new(0), len: AtomicUsize::new(0), lost: AtomicBool::new(false) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The page size and the SIGBUS action found at installation (called for faults not ours).
struct Installed {
    page: usize,
    previous: nix::sys::signal::SigAction,
}
static INSTALLED: OnceLock<Result<Installed, nix::Error>> = OnceLock::new();

/// A registered mapping; unregistered when dropped (before the mapping goes).
pub struct Watch {
    slot: usize,
}

impl Watch {
    /// A SIGBUS hit the mapping: part of it no longer reaches the file.
    pub fn lost(&self) -> bool {
        TABLE[self.slot].lost.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.len.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
        s.lost.store(false, Ordering::SeqCst);
        s.used.store(false, Ordering::SeqCst);
    }
}

/// Watches the mapping `[start, start + len)` (see the module's doc). `None` if the handler
/// cannot be installed or every slot is taken: the mapping then works as before, unwatched.
pub fn watch(start: *const u8, len: usize) -> Option<Watch> {
    let installed = INSTALLED.get_or_init(install);
    if let Err(e) = installed {
        log::warn!("cannot install the SIGBUS handler ({e}): a truncated bitmap file would end the daemon");
        return None;
    }
    let slot = TABLE.iter().position(|s| s.used.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok())?;
    let s = &TABLE[slot];
    s.lost.store(false, Ordering::SeqCst);
    s.start.store(start as usize, Ordering::SeqCst);
    // Last: from here the handler looks at this slot.
    s.len.store(len, Ordering::SeqCst);
    Some(Watch { slot })
}

fn install() -> Result<Installed, nix::Error> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    };
    let ours = SigAction::new(SigHandler::SigAction(on_sigbus), SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK, SigSet::empty());
    // SAFETY: the handler (on_sigbus) touches only atomics and makes system calls; it calls the
    // previous handler, which its installer made safe to call from a signal.
    let previous = unsafe { sigaction(Signal::SIGBUS, &ours) }?;
    Ok(Installed { page, previous })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // (Installed before the handler: a SIGBUS cannot arrive here before it is set.)
    let Some(Ok(inst)) = INSTALLED.get() else { return };
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for SIGBUS, si_addr is
    // the fault address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &TABLE {
        let len = s.len.load(Ordering::SeqCst);
        let start = s.start.load(Ordering::SeqCst);
        if len == 0 || addr < start || addr - start >= len {
            continue;
        }
        let page = addr & !(inst.page - 1);
        // SAFETY: the page lies in a mapping its owner registered and keeps mapped while
        // registered (Watch is dropped before the mapping); MAP_FIXED replaces that page alone
        // with private zeroed memory, which the faulting access then reads or writes.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                inst.page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            s.lost.store(true, Ordering::SeqCst);
            return;
        }
        break;
    }
    // Not a watched mapping (or its page could not be replaced): what happened before.
    use nix::sys::signal::SigHandler;
    match inst.previous.handler() {
        // Installed for SIGBUS with SA_SIGINFO: it takes these arguments.
        SigHandler::SigAction(f) => f(sig, info, ctx),
        SigHandler::Handler(f) => f(sig),
        SigHandler::SigIgn | SigHandler::SigDfl => {
            // The default action: back to it, and the faulting access, executed again on
            // return, raises SIGBUS once more and ends the process as it would have.
            // SAFETY: restoring the default disposition has no preconditions.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}
