//! Latency histograms of fixed size, so memory never grows with trace length.

/// Log-linear histogram: 8 sub-buckets per power of two, each reported by its midpoint, so
/// every percentile is within 6.25% (half a sub-bucket) of the true value.
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: [u64; Self::BUCKETS],
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: [0; Self::BUCKETS], count: 0 }
    }
}

impl Histogram {
    const SUB_BITS: u32 = 3;
    const BUCKETS: usize = 64 << Self::SUB_BITS;

    fn bucket(value: u64) -> usize {
        if value < (1 << Self::SUB_BITS) {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros();
        let mantissa = (value >> (exponent - Self::SUB_BITS)) & ((1 << Self::SUB_BITS) - 1);
        (((exponent - Self::SUB_BITS + 1) << Self::SUB_BITS) as u64 + mantissa) as usize
    }

    /// The midpoint of the bucket's value range.
    fn representative(bucket: usize) -> u64 {
        let sub = 1usize << Self::SUB_BITS;
        if bucket < sub {
            return bucket as u64;
        }
        let exponent = (bucket / sub) as u32 + Self::SUB_BITS - 1;
        let mantissa = (bucket % sub) as u64;
        let width = 1u64 << (exponent - Self::SUB_BITS);
        let low = (1u64 << exponent) + mantissa * width;
        low + width / 2
    }

    pub fn record(&mut self, value: u64) {
        self.buckets[Self::bucket(value)] += 1;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// `quantile` in 0..=1; `None` when nothing was recorded.
    pub fn quantile(&self, quantile: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((quantile * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (bucket, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::representative(bucket));
            }
        }
        unreachable!("rank {rank} is at most count {}", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_bucket_precision() {
        let mut histogram = Histogram::default();
        for value in 1..=10_000u64 {
            histogram.record(value * 1000);
        }
        let p50 = histogram.quantile(0.5).unwrap() as f64;
        let p99 = histogram.quantile(0.99).unwrap() as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() <= 0.0625, "p50 {p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() <= 0.0625, "p99 {p99}");
        assert_eq!(Histogram::default().quantile(0.5), None);
        let mut small = Histogram::default();
        small.record(3);
        assert_eq!(small.quantile(0.99), Some(3));
    }

    #[test]
    fn every_value_is_reported_within_half_a_sub_bucket() {
        let mut worst = 0.0f64;
        for value in (1..100_000u64).chain((0..60).map(|shift| (1u64 << shift) * 3 / 2 + 1)) {
            let mut histogram = Histogram::default();
            histogram.record(value);
            let reported = histogram.quantile(0.5).unwrap() as f64;
            worst = worst.max((reported / value as f64 - 1.0).abs());
        }
        assert!(worst <= 0.0625, "worst relative error {worst}");
        assert!(worst > 0.05, "the bound is tight: {worst}");
    }
}
