//! `BlockSet`: a bitset over the blocks of a fixed-size linear space, with run extraction.
//!
//! The memory layer counts 4 KiB pages of a region with it (dirty, private and pre-copied sets,
//! the pages a layer image provides); the disk layer in `devices` counts 512-byte sectors.

/// A set of block indices `0..capacity`: one bit per block (a page of a region, a sector of a
/// disk). Indices past the capacity are ignored on insert and never contained.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
    blocks: usize,
}

impl BlockSet {
    /// An empty set over `blocks` blocks.
    pub fn new(blocks: usize) -> Self {
        BlockSet { words: vec![0; blocks.div_ceil(64)], blocks }
    }

    /// A set over `blocks` blocks holding `runs` (first block, block count), as `runs`
    /// returns them (a saved diff's list); blocks past the end are ignored.
    pub fn from_runs(blocks: usize, runs: &[(usize, usize)]) -> Self {
        let mut set = BlockSet::new(blocks);
        for &(first, count) in runs {
            set.insert_range(first, count);
        }
        set
    }

    /// Number of blocks the set can hold.
    pub fn capacity(&self) -> usize {
        self.blocks
    }

    pub fn insert(&mut self, block: usize) {
        if block < self.blocks {
            self.words[block / 64] |= 1 << (block % 64);
        }
    }

    pub fn insert_range(&mut self, first: usize, count: usize) {
        for block in first..first.saturating_add(count).min(self.blocks) {
            self.insert(block);
        }
    }

    pub fn remove(&mut self, block: usize) {
        if block < self.blocks {
            self.words[block / 64] &= !(1 << (block % 64));
        }
    }

    pub fn contains(&self, block: usize) -> bool {
        block < self.blocks && self.words[block / 64] & (1 << (block % 64)) != 0
    }

    /// Adds every bit of `words` (a KVM- or vm-memory-style dirty bitmap, bit i = block i).
    /// Bits past the region's end are ignored.
    pub(crate) fn or_words(&mut self, words: &[u64]) {
        for (mine, theirs) in self.words.iter_mut().zip(words) {
            *mine |= theirs;
        }
        self.trim_tail();
    }

    pub fn union_with(&mut self, other: &BlockSet) {
        self.or_words(&other.words);
    }

    /// Removes every bit of `words` (same layout as [`BlockSet::or_words`]).
    pub(crate) fn subtract_words(&mut self, words: &[u64]) {
        for (mine, theirs) in self.words.iter_mut().zip(words) {
            *mine &= !theirs;
        }
    }

    /// Removes every block of `other`.
    pub fn subtract(&mut self, other: &BlockSet) {
        self.subtract_words(&other.words);
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The blocks in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// Maximal runs of consecutive blocks, as (first block, block count).
    pub fn runs(&self) -> Vec<(usize, usize)> {
        self.runs_skipping(None).0
    }

    /// Maximal runs of the blocks of this set that are not in `skip`, and how many blocks were
    /// skipped. One pass, no set allocated (freezes run in a pause).
    pub(crate) fn runs_skipping(&self, skip: Option<&BlockSet>) -> (Vec<(usize, usize)>, usize) {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut skipped = 0;
        for (i, &w) in self.words.iter().enumerate() {
            let drop = skip.and_then(|s| s.words.get(i)).copied().unwrap_or(0);
            skipped += (w & drop).count_ones() as usize;
            let mut bits = w & !drop;
            while bits != 0 {
                let block = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == block => *count += 1,
                    _ => runs.push((block, 1)),
                }
            }
        }
        (runs, skipped)
    }

    fn trim_tail(&mut self) {
        let spare = self.words.len() * 64 - self.blocks;
        if spare > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> spare;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_neighbours_and_ignore_bits_past_the_end() {
        let mut set = BlockSet::new(70);
        set.or_words(&[0b1110_0001, u64::MAX]);
        assert_eq!(set.runs(), vec![(0, 1), (5, 3), (64, 6)]);
        assert_eq!(set.len(), 10);
        set.insert(1000);
        assert!(!set.contains(1000));
    }

    #[test]
    fn subtract_removes_only_the_given_blocks() {
        let mut set = BlockSet::new(70);
        set.insert_range(0, 70);
        let mut other = BlockSet::new(70);
        other.insert_range(3, 63);
        set.subtract(&other);
        assert_eq!(set.runs(), vec![(0, 3), (66, 4)]);
        set.subtract_words(&[0b11]);
        assert_eq!(set.runs(), vec![(2, 1), (66, 4)]);
    }

    #[test]
    fn runs_skipping_skips_and_counts() {
        let mut set = BlockSet::new(70);
        set.insert_range(0, 10);
        set.insert(65);
        let mut skip = BlockSet::new(70);
        skip.insert_range(2, 6);
        skip.insert(65);
        skip.remove(4);
        assert_eq!(set.runs_skipping(Some(&skip)), (vec![(0, 2), (4, 1), (8, 2)], 6));
        assert_eq!(set.runs_skipping(None), (set.runs(), 0));
    }

    #[test]
    fn from_runs_inverts_runs_and_ignores_blocks_past_the_end() {
        let runs = vec![(0, 2), (63, 3), (69, 1)];
        assert_eq!(BlockSet::from_runs(70, &runs).runs(), runs);
        assert_eq!(BlockSet::from_runs(70, &[(68, 10), (usize::MAX, 5)]).runs(), vec![(68, 2)]);
    }
}
