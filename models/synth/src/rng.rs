//! The renderer's random numbers: SplitMix64, and how per-image seeds are made.
//!
//! Why our own 20-line generator instead of `rand` + `rand_chacha`/`rand_pcg`:
//! a dataset is defined by `(formulary, seed)`, so the value stream is part of
//! the data format. `rand` has changed how it turns bits into ranges and floats
//! between major versions (0.8 → 0.9), which would silently re-render every
//! dataset on a dependency bump. SplitMix64 (Steele, Lea, Flood 2014; the
//! seeder of xoshiro) has a fixed, published output sequence, passes BigCrush,
//! costs a handful of instructions and needs no dependency. It is not
//! cryptographic, and nothing here needs it to be.
//!
//! Seeds never depend on thread order or count: every image gets its own
//! generator from [`image_seed`] (dataset) or [`tray_seed`] (tray scenes), and
//! an image's draws happen in one fixed order inside one thread.

/// The SplitMix64 finaliser: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a of a string: the class key of a product is its NDC text, so a
/// product's images do not change when other products are added, removed or
/// excluded.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// Seed of image `index` of product `ndc` in a dataset rendered with `seed`.
pub fn image_seed(seed: u64, ndc: &str, index: u32) -> u64 {
    mix64(mix64(mix64(seed) ^ fnv1a64(ndc)) ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Seed of tray scene `index` rendered with `seed`.
pub fn tray_seed(seed: u64, index: u32) -> u64 {
    mix64(mix64(mix64(seed) ^ fnv1a64("tray")) ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// SplitMix64: state advances by the golden gamma, output is [`mix64`] of it.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose first output is `mix64(seed + gamma)`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// An independent stream for one purpose (pixel noise, tray texture …),
    /// so that drawing more or fewer values in one part of the scene does not
    /// shift the values of another.
    pub fn fork(&mut self, purpose: u64) -> Rng {
        Rng::new(mix64(self.next_u64() ^ mix64(purpose)))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 24 bits of resolution.
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    /// Uniform integer in `0..n` (`n > 0`), by multiply-shift (bias below 2⁻³²
    /// for the small `n` used here).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f32) -> bool {
        self.f32() < p
    }

    /// Approximately standard normal: Irwin–Hall sum of four 16-bit uniforms,
    /// centred and scaled to unit variance (tails end at ±3.46σ, which is what
    /// sensor noise and jitter want; one `u64` per sample keeps the per-pixel
    /// noise cheap).
    pub fn normal(&mut self) -> f32 {
        let x = self.next_u64();
        let sum = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        // Each term is uniform on 0..=65535: mean 32767.5, variance (65536² − 1)/12.
        // Sum of four: variance 4·65536²/12, so the standard deviation is 65536/√3.
        (sum as f32 - 4.0 * 32767.5) * (1.732_050_8 / 65536.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Vigna's reference splitmix64.c seeded with 0.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn normal_has_unit_variance_and_zero_mean() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| f64::from(r.normal())).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn seeds_differ_by_product_index_and_seed() {
        let a = image_seed(1, "00000-0000-00", 0);
        assert_ne!(a, image_seed(2, "00000-0000-00", 0));
        assert_ne!(a, image_seed(1, "00000-0000-01", 0));
        assert_ne!(a, image_seed(1, "00000-0000-00", 1));
        assert_eq!(a, image_seed(1, "00000-0000-00", 0));
        assert_ne!(tray_seed(1, 0), tray_seed(1, 1));
    }

    #[test]
    fn below_and_range_stay_in_bounds() {
        let mut r = Rng::new(3);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            let x = r.range(-2.0, 5.0);
            assert!((-2.0..5.0).contains(&x));
        }
    }
}
