//! Opening a pair's bitmap: creating it for a full sync, resuming from it, and the order of the
//! file operations that keeps every kind of crash recoverable.
//!
//! The code here is generic over [`BitmapFiles`], the file operations it needs. The engine runs
//! it over the real bitmap file ([`crate::io::bitmap::BitmapFiles`]); the deterministic simulator
//! (tests/sim.rs) runs the same code over simulated media, with a crash of each kind
//! (power loss, daemon kill) between any two of its operations.
//!
//! Two rules, each the fix of a way for source and target to end up silently different:
//!
//! 1. **A bitmap reaches its name with its final bits on the medium.** A full sync's bitmap is
//!    written with every bit set under a temporary name, made durable, and only then renamed
//!    into place (then the directory is made durable). A crash at any point leaves under the
//!    bitmap's name either nothing (a full sync again), the previous bitmap (whose set bits still
//!    cover every region that may differ), or the complete new one: never a clean bitmap for a
//!    pair that was not copied.
//! 2. **Bits are trusted only once they are durable.** After a daemon kill the page cache
//!    survives, so a bit set by a write that was still waiting for its intent flush is visible
//!    in the bitmap although it may not be on the medium. The state built from the bitmap treats
//!    every set bit as durable (a write to such a region skips the intent flush), so the bitmap
//!    is flushed once before the state is built from it.

use crate::core::{MirrorState, PersistentBits};
use crate::error::{Error, Result};

/// How the pair starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Copy everything: a new bitmap with every bit set, durable before the first copy, so an
    /// interrupted initial sync resumes where it stopped.
    Full,
    /// The user declares source and target identical: a new bitmap with every bit clear.
    // Spelt `none` on the command line and in saved state.
    #[value(name = "none")]
    #[serde(rename = "none")]
    AssumeIdentical,
    /// Use the bitmap as found: copy only what it says is dirty.
    Resume,
}

/// The bits a new bitmap is created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every bit clear: the pair is declared identical.
    Clean,
    /// Every bit set: everything is to be copied.
    Dirty,
}

/// The file operations of a bitmap's lifecycle. Each may fail; the caller then stops, and what is
/// on the media stays recoverable whatever step it stopped at (see the module's rules).
pub trait BitmapFiles {
    type Bits: PersistentBits;
    /// A bitmap exists under the bitmap's name (as the process sees the directory).
    fn exists(&self) -> bool;
    /// Creates a temporary file beside the bitmap holding a complete new bitmap: the header and
    /// every bit as `fill` says (written, not yet durable).
    fn write_temp(&mut self, fill: Fill) -> Result<()>;
    /// Makes the temporary file's contents durable (fsync).
    fn sync_temp(&mut self) -> Result<()>;
    /// Renames the temporary file over the bitmap's name.
    fn rename_temp(&mut self) -> Result<()>;
    /// Makes the directory, and so the rename, durable.
    fn sync_dir(&mut self) -> Result<()>;
    /// Removes the temporary file after a failure (best effort; a leftover is never read).
    fn discard_temp(&mut self);
    /// Opens the bitmap under its name. `created`: it is the one just created here (the real
    /// implementation then skips the checks against the pair, which it wrote itself).
    fn open(&mut self, created: bool) -> Result<Self::Bits>;
    /// Makes every bit of `bits` durable (fdatasync).
    fn sync(&mut self, bits: &Self::Bits) -> Result<()>;
}

/// The mode a request means: none given, a new bitmap is a full sync and an existing one is
/// resumed. Asking to resume a bitmap that does not exist is an error (`describe` names it).
pub fn resolve_mode(requested: Option<SyncMode>, exists: bool, describe: &dyn Fn() -> String) -> Result<SyncMode> {
    let mode = requested.unwrap_or(if exists { SyncMode::Resume } else { SyncMode::Full });
    if mode == SyncMode::Resume && !exists {
        return Err(Error::config(format!(
            "bitmap {} does not exist, so there is nothing to resume: omit --sync resume (a new \
             bitmap means a full sync) or give the existing bitmap's path",
            describe()
        )));
    }
    Ok(mode)
}

/// What [`open_bitmap`] made.
pub struct Opened<B: PersistentBits> {
    pub state: MirrorState<B>,
    /// A new bitmap was created (full sync or none).
    pub created: bool,
}

/// Opens the bitmap for `mode` (from [`resolve_mode`]) and builds the mirror's state from it.
/// Full and none create a new bitmap, replacing an existing one atomically (rule 1); resume opens
/// the existing one. Either way the directory entry and the bits are flushed before they are
/// trusted (rule 2).
pub fn open_bitmap<F: BitmapFiles>(files: &mut F, mode: SyncMode) -> Result<Opened<F::Bits>> {
    let created = match mode {
        SyncMode::Resume => false,
        SyncMode::Full | SyncMode::AssumeIdentical => {
            let fill = if mode == SyncMode::Full { Fill::Dirty } else { Fill::Clean };
            let publish = |files: &mut F| -> Result<()> {
                files.write_temp(fill)?;
                files.sync_temp()?;
                files.rename_temp()
            };
            if let Err(e) = publish(files) {
                files.discard_temp();
                return Err(e);
            }
            true
        }
    };
    // The name is trusted only once it is durable, like the bits: until then a power loss may
    // bring back the previous bitmap (or none). That is recoverable as long as nothing relies on
    // the new one, and after a daemon kill between a rename and this sync, resuming the renamed
    // bitmap relies on it: its bits would cover writes the previous one never saw.
    files.sync_dir()?;
    let bits = files.open(created)?;
    let state = trusted_state(bits, |b| files.sync(b))?;
    Ok(Opened { state, created })
}

/// The mirror's state from bits found in a bitmap, made durable first (rule 2): `sync` flushes
/// them. Every other way of building the state from a bitmap goes through here too.
pub fn trusted_state<B: PersistentBits>(bits: B, sync: impl FnOnce(&B) -> Result<()>) -> Result<MirrorState<B>> {
    sync(&bits)?;
    let n = bits.nregions();
    Ok(MirrorState::new(n, bits))
}

/// How a switchover records itself in the bitmap's header (rule 7 of docs/crash-safety.md).
pub trait RecordSwitch {
    /// What the header is to record: for the real bitmap, the switched-over state, or the
    /// reversed pair (`switchover --reverse`).
    type Switch;
    /// Writes it into the header and makes it durable before returning.
    fn record_switch(&mut self, s: Self::Switch) -> Result<()>;
}

/// The pair may switch over: no write in flight, nothing dirty or being copied, and the last
/// consistent point current, so the target's medium holds every write acknowledged so far. The
/// caller holds new writes meanwhile.
pub fn switchover_ready<B: PersistentBits>(state: &MirrorState<B>) -> bool {
    state.writes_in_flight() == 0 && state.active_writes() == 0 && state.is_synced()
}

/// A switchover's durable step: records `s` in the header, durably, if the pair is ready. The
/// caller lets no write reach the new data before this returned `Ok`; a crash before then
/// resumes the old pair (nothing was written since it was synced), a crash after it follows
/// the header.
pub fn record_switchover<B: PersistentBits + RecordSwitch>(state: &mut MirrorState<B>, s: B::Switch) -> Result<()> {
    if !switchover_ready(state) {
        return Err(Error::config("the pair is not synced any more: the switchover was not recorded"));
    }
    state.pbits_mut().record_switch(s)
}
