//! Slow start: a backend that comes up while its service runs (recovered from down, or added)
//! takes new connections at a share of its weight that rises in steps over the service's
//! `slow_start`, as HAProxy's `slowstart` does: a cold cache or a warming runtime is not handed
//! its full share at once. Connections already placed keep their backend; only the Maglev
//! table changes, once per step.

use std::time::Duration;

/// At most this many steps per ramp; fewer when it is short, so that steps (each a table
/// published) are at least STEP_MIN apart.
pub const STEPS_MAX: u32 = 10;
pub const STEP_MIN: Duration = Duration::from_millis(500);
/// Table weights are the configured ones times this, so that a backend of weight 1 can take a
/// tenth of its share (Maglev weights are relative: scaling all of them changes nothing).
pub const SCALE: u32 = STEPS_MAX;

/// Where a ramp stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ramp {
    /// `step` of `steps` (from 0): the backend takes `step / steps` of its weight, at least the
    /// smallest share there is.
    Step {
        step: u32,
        steps: u32,
    },
    Done,
}

impl Ramp {
    /// The ramp `elapsed` into a slow start of `duration`.
    pub fn at(elapsed: Duration, duration: Duration) -> Ramp {
        if elapsed >= duration {
            return Ramp::Done;
        }
        let steps = (duration.as_nanos() / STEP_MIN.as_nanos()).clamp(1, u128::from(STEPS_MAX));
        let step = elapsed.as_nanos() * steps / duration.as_nanos();
        Ramp::Step {
            step: step as u32,
            steps: steps as u32,
        }
    }

    /// The weight the table gives a backend of configured `weight` (`SCALE` times it when not
    /// ramping).
    pub fn table_weight(self, weight: u32) -> u32 {
        let full = weight.saturating_mul(SCALE);
        match self {
            Ramp::Done => full,
            Ramp::Step { .. } if weight == 0 => 0,
            Ramp::Step { step, steps } => {
                let share = u64::from(full) * u64::from(step) / u64::from(steps.max(1));
                (share as u32).max(1)
            }
        }
    }

    /// The share of its weight the backend takes, in percent.
    pub fn percent(self) -> u32 {
        match self {
            Ramp::Done => 100,
            Ramp::Step { step, steps } => step * 100 / steps.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_ramp_rises_in_steps_to_the_full_weight() {
        let ten_s = Duration::from_secs(10);
        let weights: Vec<u32> = (0..=10)
            .map(|s| Ramp::at(Duration::from_secs(s), ten_s).table_weight(6))
            .collect();
        // A tenth of the weight more each second, from the smallest share there is.
        assert_eq!(weights, [1, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60]);
        assert_eq!(Ramp::at(MS(9_999), ten_s).percent(), 90);
        assert_eq!(Ramp::at(ten_s, ten_s), Ramp::Done);
    }

    #[test]
    fn short_ramps_take_fewer_steps() {
        assert_eq!(Ramp::at(MS(0), MS(2_000)), Ramp::Step { step: 0, steps: 4 });
        assert_eq!(
            Ramp::at(MS(1_999), MS(2_000)),
            Ramp::Step { step: 3, steps: 4 }
        );
        // Shorter than one step: one step at the smallest share, then the full weight.
        assert_eq!(Ramp::at(MS(100), MS(300)), Ramp::Step { step: 0, steps: 1 });
        assert_eq!(Ramp::at(MS(300), MS(300)), Ramp::Done);
    }

    #[test]
    fn weights_scale_alike_so_the_table_keeps_its_shares() {
        assert_eq!(Ramp::Done.table_weight(4), 40);
        assert_eq!(Ramp::Step { step: 3, steps: 10 }.table_weight(0), 0);
        assert_eq!(Ramp::Step { step: 0, steps: 10 }.table_weight(10_000), 1);
        assert_eq!(Ramp::Done.table_weight(10_000), 100_000);
    }
}
