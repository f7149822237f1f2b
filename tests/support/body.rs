//! Large deterministic bodies and a checksum that both ends of a transfer compute.
//!
//! The body is a sequence of 64 KiB blocks; each block starts with its own index, so a block that
//! is lost, repeated or reordered changes the checksum, not just a flipped byte.

use std::sync::OnceLock;

use bytes::Bytes;

pub const BLOCK: usize = 64 * 1024;

fn base_block() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        // xorshift64: cheap, and no two neighbouring bytes repeat a short pattern.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    })
}

/// Block `index` of a pattern body, cut to `len` bytes (`len <= BLOCK`).
pub fn block(index: u64, len: usize) -> Bytes {
    let mut data = base_block()[..len].to_vec();
    let tag = index.to_le_bytes();
    let n = tag.len().min(len);
    data[..n].copy_from_slice(&tag[..n]);
    Bytes::from(data)
}

/// The blocks of a `total`-byte pattern body, in order.
pub fn blocks(total: u64) -> impl Iterator<Item = Bytes> + Send + 'static {
    let count = total.div_ceil(BLOCK as u64);
    (0..count).map(move |i| {
        let start = i * BLOCK as u64;
        let len = (total - start).min(BLOCK as u64) as usize;
        block(i, len)
    })
}

/// The checksum of the `total`-byte pattern body, computed the same way a receiver would.
pub fn expected(total: u64) -> Checksum {
    let mut sum = Checksum::new();
    for b in blocks(total) {
        sum.update(&b);
    }
    sum
}

/// FNV-1a over every byte, plus the length: order-sensitive and independent of how the bytes
/// were split into reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub hash: u64,
    pub len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    pub fn new() -> Checksum {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.hash;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.hash = h;
        self.len += data.len() as u64;
    }

    pub fn of(data: &[u8]) -> Checksum {
        let mut sum = Checksum::new();
        sum.update(data);
        sum
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.hash)
    }
}
