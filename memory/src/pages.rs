//! Guest pages: the unit every set, run and count of the memory layer is in.

use crate::blockset::BlockSet;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

/// A set of pages of one region (bit i = the region's page i).
pub(crate) type PageSet = BlockSet;

/// First page and page count covering the bytes `offset..offset+len` of a region.
pub(crate) fn page_span(offset: usize, len: usize) -> (usize, usize) {
    let first = offset / PAGE_SIZE;
    let end = (offset + len).div_ceil(PAGE_SIZE);
    (first, end - first)
}
