//! When long decode or training work must stop early: its clients all left, the server is shutting down, or it
//! ran out of `max_episode_seconds`. Checked between slices of work (a rollout decode step, an
//! update micro-batch), so an episode stops within one slice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct Interrupt {
    cancelled: Arc<AtomicBool>,
    deadline: Option<(Instant, Duration)>,
}

impl Interrupt {
    /// Never fires on its own; [`Self::cancel`] still stops it.
    pub fn never() -> Self {
        Self::default()
    }

    /// Fires `seconds` from now (never, if that is beyond what a clock can hold; at once if
    /// it is not a positive number).
    pub fn after_seconds(seconds: f64) -> Self {
        let limit = Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX);
        Self {
            cancelled: Arc::default(),
            deadline: Instant::now().checked_add(limit).map(|at| (at, limit)),
        }
    }

    /// Stops the episode at its next check (clones share the flag).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Its deadline passed (and it was not cancelled).
    pub fn timed_out(&self) -> bool {
        !self.cancelled.load(Ordering::SeqCst)
            && self.deadline.is_some_and(|(at, _)| Instant::now() >= at)
    }

    pub fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(Error::Interrupted("the episode was cancelled".into()));
        }
        match self.deadline {
            Some((at, limit)) if Instant::now() >= at => Err(Error::Interrupted(format!(
                "the episode ran out of its {} s (adaptation.max_episode_seconds)",
                limit.as_secs_f64()
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_fires_on_cancel_or_deadline_and_clones_share_the_flag() {
        let i = Interrupt::never();
        assert!(i.check().is_ok());
        i.clone().cancel();
        assert!(matches!(i.check(), Err(Error::Interrupted(_))));
        let late = Interrupt::after_seconds(0.0);
        let Err(Error::Interrupted(why)) = late.check() else {
            panic!("a zero deadline must fire");
        };
        assert!(why.contains("max_episode_seconds"), "{why}");
        assert!(late.timed_out() && !i.timed_out());
        let cancelled_late = Interrupt::after_seconds(0.0);
        cancelled_late.cancel();
        assert!(!cancelled_late.timed_out(), "a cancel is not a deadline");
        assert!(Interrupt::after_seconds(60.0).check().is_ok());
        assert!(Interrupt::after_seconds(f64::INFINITY).check().is_ok());
        assert!(Interrupt::after_seconds(-1.0).check().is_err());
    }
}
