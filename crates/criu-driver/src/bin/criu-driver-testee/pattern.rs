//! The memory pattern of `criu-driver-testee`, shared with the integration tests
//! (`tests/page_server_criu.rs` includes this file).
//!
//! Page `i` of a region starts with the region's magic and `i`, then 509 pseudo-random words
//! derived from both, then a checksum of the first 511 words: every page is distinct and
//! a page in the wrong place, a stale page or a flipped bit is detected.

/// Bytes in a page.
pub(crate) const PAGE: usize = 4096;
/// First word of every heap page.
pub(crate) const HEAP_MAGIC: u64 = 0x4645_5252_5948_4541; // "FERRYHEA"
/// First word of every memfd page.
pub(crate) const MEMFD_MAGIC: u64 = 0x4645_5252_594d_4644; // "FERRYMFD"

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The 512 words of page `index` of the region with `magic`.
pub(crate) fn page_words(magic: u64, index: u64) -> [u64; PAGE / 8] {
    let mut w = [0u64; PAGE / 8];
    w[0] = magic;
    w[1] = index;
    let seed = splitmix64(magic ^ index.rotate_left(29));
    for (k, word) in w.iter_mut().enumerate().take(PAGE / 8 - 1).skip(2) {
        *word = splitmix64(seed.wrapping_add(k as u64));
    }
    w[PAGE / 8 - 1] = w[..PAGE / 8 - 1]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |acc, x| {
            (acc ^ x).wrapping_mul(0x1000_0000_01b3)
        });
    w
}

/// Writes page `index` of the region with `magic` into `page` (4096 bytes).
pub(crate) fn fill_page(magic: u64, index: u64, page: &mut [u8]) {
    for (chunk, word) in page.chunks_exact_mut(8).zip(page_words(magic, index)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
}

/// Whether `page` holds exactly page `index` of the region with `magic`.
pub(crate) fn page_is_intact(magic: u64, index: u64, page: &[u8]) -> bool {
    page.len() == PAGE
        && page
            .chunks_exact(8)
            .zip(page_words(magic, index))
            .all(|(chunk, word)| chunk == word.to_le_bytes())
}

/// The (magic, index) a page claims to be, from its first two words.
pub(crate) fn page_identity(page: &[u8]) -> Option<(u64, u64)> {
    if page.len() < 16 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().unwrap());
    Some((word(0), word(1)))
}
