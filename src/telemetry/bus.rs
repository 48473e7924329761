//! The fan-out of events to sinks. A sink that fails is detached with one warning to the
//! others, so a broken renderer or logger never stops training. Records emitted before the
//! run folder exists are kept and replayed into the event log when it is attached, so
//! `events.jsonl` holds the whole run.

use super::events::{Event, Record};
use super::sinks::EventSink;

/// Sinks of one run.
pub struct EventBus {
    sinks: Vec<Box<dyn EventSink>>,
    /// Records not yet given to the event log (`None` once it is attached).
    early: Option<Vec<Record>>,
}

impl EventBus {
    /// A bus over some sinks; records are kept for [`EventBus::attach_log`].
    pub fn new(sinks: Vec<Box<dyn EventSink>>) -> Self {
        EventBus {
            sinks,
            early: Some(Vec::new()),
        }
    }

    /// Stamps an event and gives it to every sink.
    pub fn emit(&mut self, event: Event) {
        let record = Record::now(event);
        if let Some(early) = &mut self.early {
            early.push(record.clone());
        }
        let failed = deliver(&mut self.sinks, &record);
        self.detach(failed);
    }

    /// Attaches the event log: it receives every record emitted so far, then the rest.
    pub fn attach_log(&mut self, mut log: Box<dyn EventSink>) {
        let early = self.early.take().unwrap_or_default();
        for r in &early {
            if let Err(e) = log.emit(r) {
                let msg = format!(
                    "{} failed ({e}); it is detached, training continues",
                    log.name()
                );
                self.emit(Event::Warning { message: msg });
                return;
            }
        }
        self.sinks.push(log);
    }

    /// Tells every sink the run is over.
    pub fn finish(&mut self) {
        let mut failed = Vec::new();
        for (i, s) in self.sinks.iter_mut().enumerate() {
            if let Err(e) = s.finish() {
                failed.push((i, e));
            }
        }
        self.detach(failed);
    }

    /// Number of attached sinks.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// Whether no sink is attached.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Removes failed sinks and warns the remaining ones (repeatedly, should a warning fail).
    fn detach(&mut self, mut failed: Vec<(usize, crate::Error)>) {
        while !failed.is_empty() {
            let mut warnings = Vec::new();
            for (i, e) in failed.into_iter().rev() {
                let sink = self.sinks.remove(i);
                warnings.push(format!(
                    "{} failed ({e}); it is detached, training continues",
                    sink.name()
                ));
            }
            failed = Vec::new();
            for message in warnings.into_iter().rev() {
                if self.sinks.is_empty() {
                    // Nothing is left to show it; stderr is all there is (and may be closed).
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "warning: {message}");
                    continue;
                }
                let record = Record::now(Event::Warning { message });
                if let Some(early) = &mut self.early {
                    early.push(record.clone());
                }
                failed.extend(deliver(&mut self.sinks, &record));
            }
            failed.sort_by_key(|(i, _)| *i);
            failed.dedup_by_key(|(i, _)| *i);
        }
    }
}

/// Gives a record to every sink; returns the failures by index (ascending).
fn deliver(sinks: &mut [Box<dyn EventSink>], record: &Record) -> Vec<(usize, crate::Error)> {
    let mut failed = Vec::new();
    for (i, s) in sinks.iter_mut().enumerate() {
        if let Err(e) = s.emit(record) {
            failed.push((i, e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::MemorySink;

    struct Failing;
    impl EventSink for Failing {
        fn name(&self) -> String {
            "broken sink".into()
        }
        fn emit(&mut self, _: &Record) -> crate::Result<()> {
            Err(crate::Error::invalid("cannot draw"))
        }
    }

    #[test]
    fn a_failing_sink_is_detached_with_one_warning_and_the_log_gets_everything() {
        let mem = MemorySink::default();
        let mut bus = EventBus::new(vec![Box::new(Failing), Box::new(mem.clone())]);
        bus.emit(Event::Info {
            message: "a".into(),
        });
        bus.emit(Event::Info {
            message: "b".into(),
        });
        assert_eq!(bus.len(), 1);
        let log = MemorySink::default();
        bus.attach_log(Box::new(log.clone()));
        bus.emit(Event::Info {
            message: "c".into(),
        });
        let seen = mem.events();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(
            matches!(&seen[1], Event::Warning { message } if message.contains("broken sink") && message.contains("cannot draw"))
        );
        assert_eq!(log.events(), seen);
    }
}
