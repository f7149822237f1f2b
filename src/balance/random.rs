//! Weighted random choice. STUB: the helper replaces this file.

use super::Candidates;

#[derive(Debug)]
pub struct WeightedRandom {
    weights: Box<[u32]>,
}

impl WeightedRandom {
    pub fn new(weights: &[u32]) -> WeightedRandom {
        WeightedRandom {
            weights: weights.into(),
        }
    }

    pub fn pick(&self, c: &dyn Candidates) -> Option<usize> {
        let _ = &self.weights;
        pick_uniform(c)
    }
}

/// Any eligible server, each equally likely.
pub fn pick_uniform(c: &dyn Candidates) -> Option<usize> {
    (0..c.len()).find(|&i| c.eligible(i))
}
