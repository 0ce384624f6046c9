//! Surviving a mapped bitmap file that shrinks under the daemon.
//!
//! The bitmap is a shared mapping of a file. If another process truncates that file (a mistaken
//! `truncate`, `> file`) or its pages cannot be read back from a failing disk, the next access to a page past the new end of the file raises SIGBUS, whose default
//! action kills the daemon, and with it every application using the device.
//!
//! [`watch`] registers a mapping. A fault (SIGBUS raised by the kernel for an access) whose
//! address lies in a registered mapping is answered by mapping private memory over the faulting
//! page, filled with ones (for a bitmap: every region of the page reads as dirty, so that
//! whatever reads it copies too much rather than too little), and by raising the mapping's
//! "lost" flag; the access then completes on memory that no longer reaches the file. Any other
//! SIGBUS goes to the handler that was installed before (Rust's own), or gets the default action
//! (death), as without this module. The owner of the mapping checks [`Watch::lost`] before it
//! counts on the file (a bitmap flush) and stops trusting it.
//!
//! The handler reads atomics and makes `mmap`, `memset`-like stores and, for a signal it does not
//! take, `sigaction`/`raise`: system calls and memory stores (mmap is not in POSIX's list of
//! async-signal-safe functions, but Linux's is a plain system call that takes no lock a
//! user-space thread could hold).

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
///
/// # Safety
///
/// `[start, start + len)` is a mapping of the caller's that stays mapped, and that nothing but
/// the caller uses, until the returned [`Watch`] is dropped: the handler maps over its pages.
pub unsafe fn watch(start: *const u8, len: usize) -> Option<Watch> {
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

/// The default action for a SIGBUS this module does not take: restored, and the signal raised
/// again if it was sent (a fault raises it again by itself when the access is retried).
fn default_action(sent: bool) {
    // SAFETY: restoring the default disposition and raising a signal have no preconditions.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        if sent {
            libc::raise(libc::SIGBUS);
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: raised by the kernel for a fault, at si_addr; otherwise sent (kill, raise).
    let fault = code > 0;
    // The handler is set inside INSTALLED's initialisation, before the value is stored: a
    // signal in that window (or after a failed installation) gets the default action.
    let Some(Ok(inst)) = INSTALLED.get() else { return default_action(!fault) };
    for s in TABLE.iter().filter(|_| fault) {
        let len = s.len.load(Ordering::SeqCst);
        let start = s.start.load(Ordering::SeqCst);
        // A slot being emptied or refilled meanwhile shows len 0 (cleared first, set last).
        if len == 0 || addr < start || addr - start >= len || s.len.load(Ordering::SeqCst) != len {
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
            // SAFETY: `p` is the page just mapped, readable and writable, inst.page bytes long.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0xff, inst.page) };
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
        // The default action: restored, and a fault, executed again on return, raises SIGBUS
        // once more and ends the process as it would have; a sent signal is raised again.
        SigHandler::SigIgn | SigHandler::SigDfl => default_action(!fault),
    }
}
