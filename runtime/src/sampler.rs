//! Token sampling, in llama.cpp's order: repetition penalty → top-k → top-p → min-p →
//! temperature → draw. `temperature == 0` is greedy (argmax, first index on ties).

/// Sampling settings (llama.cpp's flag names and defaults).
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// OpenAI's presence and frequency penalties, over the same window as llama.cpp applies
    /// them: `logit -= presence·[count > 0] + frequency·count`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: SplitMix64,
}

/// A small, seeded, reproducible generator (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> usize {
    // the first index of the largest value (NaNs never win; a NaN first wins, as a scan that
    // keeps the first of `x > best` gives): the maximum over 16 independent lanes (a scan's
    // compare chain ran at ~4 cycles per logit), then its first index
    match xs.first() {
        None => return 0,
        Some(x) if x.is_nan() => return 0,
        Some(_) => {}
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let top = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    xs.iter().position(|&x| x == top).unwrap_or(0)
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = SplitMix64(cfg.seed);
        Sampler { cfg, rng }
    }

    pub fn greedy() -> Sampler {
        Sampler::new(SamplerConfig { temperature: 0.0, ..SamplerConfig::default() })
    }

    /// Whether any penalty changes logits.
    fn penalizes(&self) -> bool {
        let (p, pres, freq) = (self.cfg.repeat_penalty, self.cfg.presence_penalty, self.cfg.frequency_penalty);
        !(p == 1.0 && pres == 0.0 && freq == 0.0) && self.cfg.repeat_last_n != 0
    }

    /// Applies the repetition, presence and frequency penalties to the tokens seen in the last
    /// `repeat_last_n` of `history`.
    pub fn penalize(&self, logits: &mut [f32], history: &[i32]) {
        if !self.penalizes() {
            return;
        }
        let (p, pres, freq) = (self.cfg.repeat_penalty, self.cfg.presence_penalty, self.cfg.frequency_penalty);
        let start = history.len().saturating_sub(self.cfg.repeat_last_n);
        let mut seen: Vec<usize> = history[start..].iter().filter_map(|&t| usize::try_from(t).ok()).collect();
        seen.sort_unstable();
        let mut i = 0;
        while i < seen.len() {
            let t = seen[i];
            let count = seen[i..].iter().take_while(|&&u| u == t).count();
            if let Some(l) = logits.get_mut(t) {
                if p != 1.0 {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
                *l -= pres + freq * count as f32;
            }
            i += count;
        }
    }

    /// The candidates left after top-k, top-p and min-p, with their probabilities at the
    /// configured temperature (sorted by probability, descending).
    pub fn candidates(&self, logits: &[f32]) -> Vec<(usize, f64)> {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let probs = |ids: &[usize], temp: f64| -> Vec<f64> {
            let max = logits[ids[0]] as f64;
            let e: Vec<f64> = ids.iter().map(|&i| ((logits[i] as f64 - max) / temp).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect()
        };
        // top-p: the smallest prefix with mass >= p (probabilities at temperature 1, as llama.cpp).
        if self.cfg.top_p < 1.0 {
            let p = probs(&idx, 1.0);
            let mut mass = 0.0;
            let mut keep = idx.len();
            for (i, q) in p.iter().enumerate() {
                mass += q;
                if mass >= self.cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            idx.truncate(keep.max(1));
        }
        // min-p: drop tokens whose probability is below min_p × the top probability.
        if self.cfg.min_p > 0.0 {
            let p = probs(&idx, 1.0);
            let threshold = p[0] * self.cfg.min_p as f64;
            let keep = p.iter().take_while(|&&q| q >= threshold).count();
            idx.truncate(keep.max(1));
        }
        let p = probs(&idx, self.cfg.temperature.max(1e-6) as f64);
        idx.into_iter().zip(p).collect()
    }

    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f32], history: &[i32]) -> i32 {
        if self.cfg.temperature <= 0.0 && !self.penalizes() {
            // greedy without penalties: no copy of the vocabulary's logits
            return argmax(logits) as i32;
        }
        let mut l = logits.to_vec();
        self.penalize(&mut l, history);
        if self.cfg.temperature <= 0.0 {
            return argmax(&l) as i32;
        }
        let cands = self.candidates(&l);
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        for &(i, p) in &cands {
            acc += p;
            if r < acc {
                return i as i32;
            }
        }
        cands.last().map_or(0, |c| c.0 as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerConfig {
        SamplerConfig { temperature, top_k, top_p, min_p, seed: 7, ..SamplerConfig::default() }
    }

    #[test]
    fn temperature_zero_is_argmax_first_on_ties() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    /// The lane-parallel argmax picks what a first-of-`>` scan picks: ties, NaNs (first or
    /// not), infinities, every length around the 16-lane chunks.
    #[test]
    fn argmax_equals_a_scan() {
        fn scan(xs: &[f32]) -> usize {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] {
                    best = i;
                }
            }
            best
        }
        let mut rng = SplitMix64(3);
        let pick = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0, 2.0, -3.0];
        for len in 0..70 {
            for _ in 0..200 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = rng.next_f64();
                        if r < 0.5 {
                            pick[(r * 16.0) as usize % pick.len()]
                        } else {
                            (r * 8.0).floor() as f32
                        }
                    })
                    .collect();
                assert_eq!(argmax(&xs), scan(&xs), "{xs:?}");
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(cfg(1.5, 1, 1.0, 0.0));
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.3, 0.2, 2.0, 1.9], &[]), 2);
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_with_mass() {
        // probabilities ∝ e^[2, 1, 0, -5] ≈ [0.665, 0.245, 0.090, 0.0006]
        let ids = |p| {
            let s = Sampler::new(cfg(1.0, 0, p, 0.0));
            s.candidates(&[2.0, 1.0, 0.0, -5.0]).iter().map(|c| c.0).collect::<Vec<_>>()
        };
        assert_eq!(ids(0.9), vec![0, 1]); // 0.665 + 0.245 = 0.91 >= 0.9
        assert_eq!(ids(0.95), vec![0, 1, 2]);
        let s = Sampler::new(cfg(1.0, 0, 0.6, 0.0));
        assert_eq!(s.candidates(&[2.0, 1.0, 0.0, -5.0]).len(), 1);
    }

    #[test]
    fn min_p_is_relative_to_top() {
        let s = Sampler::new(cfg(1.0, 0, 1.0, 0.2));
        // p1/p0 = e^-1 ≈ 0.37 kept, p2/p0 = e^-2 ≈ 0.135 dropped
        let c = s.candidates(&[2.0, 1.0, 0.0]);
        assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn penalty_applies_to_seen_tokens_only() {
        let s = Sampler::new(SamplerConfig { repeat_penalty: 2.0, ..cfg(0.0, 0, 1.0, 0.0) });
        let mut l = vec![4.0, -4.0, 4.0];
        s.penalize(&mut l, &[0, 1]);
        assert_eq!(l, vec![2.0, -8.0, 4.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_occurrences() {
        let s = Sampler::new(SamplerConfig { presence_penalty: 0.5, frequency_penalty: 0.25, ..cfg(0.0, 0, 1.0, 0.0) });
        let mut l = vec![1.0, 1.0, 1.0];
        s.penalize(&mut l, &[2, 0, 2, 2]);
        assert_eq!(l, vec![1.0 - 0.75, 1.0, 1.0 - 1.25]);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg(1.0, 0, 1.0, 0.0) });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
