//! A deterministic load model for simulated meters: households with a daily and weekly shape,
//! seasonal level, appliance spikes and (for some) rooftop solar that exports at midday; small
//! businesses with a weekday opening-hours plateau. Values are net Wh per interval (export < 0);
//! a meter reports max(v, 0) on its import channel and max(−v, 0) on its export channel.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What kind of site a simulated meter measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Site {
    Household { solar_kwp: f64 },
    Business,
}

/// One simulated meter.
#[derive(Debug, Clone)]
pub struct SimMeter {
    pub id: String,
    pub site: Site,
    /// Mean daily consumption scale (kWh per day in spring).
    pub scale_kwh: f64,
    seed: u64,
}

/// The meters of a simulated town: `households` homes (about a third with solar) and
/// `businesses` small businesses, all derived from `seed`.
pub fn town(households: usize, businesses: usize, seed: u64) -> Vec<SimMeter> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..households {
        let solar = if rng.gen_bool(0.33) {
            rng.gen_range(2.5..6.0)
        } else {
            0.0
        };
        out.push(SimMeter {
            id: format!("meter-{:04}", i + 1),
            site: Site::Household { solar_kwp: solar },
            scale_kwh: rng.gen_range(5.0..14.0),
            seed: rng.gen(),
        });
    }
    for i in 0..businesses {
        out.push(SimMeter {
            id: format!("shop-{:02}", i + 1),
            site: Site::Business,
            scale_kwh: rng.gen_range(40.0..120.0),
            seed: rng.gen(),
        });
    }
    out
}

/// Relative household demand by hour of day (two peaks), weekend flatter and later.
fn household_shape(hour: f64, weekend: bool) -> f64 {
    let g = |mu: f64, sigma: f64| (-(hour - mu).powi(2) / (2.0 * sigma * sigma)).exp();
    let (morning, evening) = if weekend {
        (g(9.5, 2.0) * 0.9, g(19.0, 2.5))
    } else {
        (g(7.5, 1.2), g(19.0, 2.0))
    };
    0.35 + 0.9 * morning + 1.4 * evening + if weekend { 0.4 * g(13.0, 3.0) } else { 0.0 }
}

impl SimMeter {
    /// Net Wh per interval for UTC day `day` (days since 1970-01-01), `interval_seconds` long
    /// (any of [`crate::linear::INTERVALS`]).
    pub fn day(&self, day: i64, interval_seconds: u32) -> Vec<i64> {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (day as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n = (86_400 / interval_seconds) as usize;
        let hours_per = f64::from(interval_seconds) / 3600.0;
        let doy = (day + 4).rem_euclid(365) as f64; // day 0 = 1970-01-01 ≈ day-of-year 0
        let winter = (2.0 * std::f64::consts::PI * (doy - 15.0) / 365.0).cos(); // +1 mid-January
        let weekday = (day + 3).rem_euclid(7); // 0 = Monday
        let weekend = weekday >= 5;
        let season = 1.0 + 0.35 * winter;
        let cloud = rng.gen_range(0.3..1.0);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let hour = (i as f64 + 0.5) * hours_per;
            let kw = match self.site {
                Site::Household { solar_kwp } => {
                    let base =
                        self.scale_kwh / 24.0 * season * household_shape(hour, weekend) / 0.85;
                    let spike = if rng.gen_bool(0.04 * hours_per * 4.0) {
                        rng.gen_range(1.0..3.0)
                    } else {
                        0.0
                    };
                    let daylight = 12.0 - 4.0 * winter;
                    let sun = ((hour - (12.0 - daylight / 2.0)) / daylight * std::f64::consts::PI)
                        .sin()
                        .max(0.0);
                    base + spike
                        - solar_kwp * 0.8 * (1.0 - 0.4 * winter.max(0.0)) * sun * sun * cloud
                }
                Site::Business => {
                    let open = !weekend && (8.0..18.0).contains(&hour);
                    let level = if open { 1.0 } else { 0.15 };
                    self.scale_kwh / 10.0 * level * season * rng.gen_range(0.85..1.15)
                }
            };
            out.push((kw * 1000.0 * hours_per).round() as i64);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_plausible_and_some_export() {
        let t = town(30, 2, 42);
        assert_eq!(t.len(), 32);
        assert_eq!(t[0].day(20_500, 900), town(30, 2, 42)[0].day(20_500, 900));
        assert_eq!(t[0].day(20_500, 300).len(), 288, "5-minute intervals");
        let mut exported = false;
        for m in &t {
            for d in 20_450..20_457 {
                let v = m.day(d, 900);
                assert_eq!(v.len(), 96);
                let total: i64 = v.iter().sum();
                assert!(
                    total > -40_000 && total < 400_000,
                    "{} day {d}: {total} Wh",
                    m.id
                );
                exported |= v.iter().any(|x| *x < 0);
            }
        }
        assert!(exported, "no simulated solar export at all");
    }
}
