//! Failure injection for the tests that prove faults stay local (testing only; off unless a
//! marker is set): a request whose prompt contains `engine.test_panic_marker` panics while
//! its tokens decode, one containing `engine.test_exit_marker` panics the engine loop itself.

use crate::model::TextTokenizer;

#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub panic_marker: Option<String>,
    pub exit_marker: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic inside the job's decode step: the job fails, the engine carries on.
    PanicInJob,
    /// Panic in the engine loop: the engine dies.
    KillEngine,
}

impl Faults {
    pub fn for_prompt(&self, tok: &TextTokenizer, prompt: &[u32]) -> Option<Fault> {
        if self.panic_marker.is_none() && self.exit_marker.is_none() {
            return None;
        }
        let text = tok.decode(prompt).unwrap_or_default();
        let has = |m: &Option<String>| m.as_deref().is_some_and(|m| text.contains(m));
        if has(&self.exit_marker) {
            Some(Fault::KillEngine)
        } else if has(&self.panic_marker) {
            Some(Fault::PanicInJob)
        } else {
            None
        }
    }
}
