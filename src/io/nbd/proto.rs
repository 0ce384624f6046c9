//! NBD protocol constants and the fixed-size messages of the transmission phase
//! (doc/proto.md of the NetworkBlockDevice/nbd project). All integers are big-endian.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253; // oldstyle negotiation
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const REQUEST_LEN: usize = 28;
pub const REPLY_LEN: usize = 16;

/// The request header: magic, command flags, type, cookie, offset, length.
pub fn request(cmd: u16, flags: u16, cookie: u64, off: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&off.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A simple reply header: (magic, error, cookie).
pub fn reply(b: &[u8; REPLY_LEN]) -> (u32, u32, u64) {
    let [m0, m1, m2, m3, e0, e1, e2, e3, c @ ..] = *b;
    (u32::from_be_bytes([m0, m1, m2, m3]), u32::from_be_bytes([e0, e1, e2, e3]), u64::from_be_bytes(c))
}

pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_WRITE_ZEROES => "write-zeroes",
        _ => "command",
    }
}

/// The errno an NBD error value stands for (the protocol's values are Linux errno numbers; an
/// unknown value is reported as EIO).
pub fn errno(nbd_error: u32) -> i32 {
    match nbd_error {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => nbd_error as i32,
        _ => libc::EIO,
    }
}

pub fn rep_err_name(t: u32) -> &'static str {
    match t {
        REP_ERR_UNSUP => "unsupported option",
        REP_ERR_POLICY => "refused by the server's policy",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on the server's platform",
        REP_ERR_TLS_REQD => "the server requires TLS",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
        REP_ERR_TOO_BIG => "request or reply too big",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let h = request(CMD_WRITE, 2, 0x0102_0304_0506_0708, 0x1000, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 2, 0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&h[24..28], &[0, 0, 2, 0]);
    }

    #[test]
    fn reply_layout() {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(reply(&b), (SIMPLE_REPLY_MAGIC, 5, 7));
        assert_eq!(errno(5), libc::EIO);
        assert_eq!(errno(28), libc::ENOSPC);
        assert_eq!(errno(1234), libc::EIO);
    }
}
