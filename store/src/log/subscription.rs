//! Following the log: a reader that sees every committed event once, in
//! order, blocking or async, never one that is not durable.

use super::*;

/// A gap-free, duplicate-free reader of the log from some sequence on.
pub struct Subscription {
    pub(super) log: EventLog,
    pub(super) next: u64,
    pub(super) buffer: std::collections::VecDeque<RecordedEvent>,
    pub(super) watch: watch::Receiver<u64>,
}

impl Subscription {
    fn refill(&mut self) -> Result<()> {
        if self.buffer.is_empty() && self.next <= self.log.head_seq() {
            let batch = self.log.read_all(self.next, 1024)?;
            if let Some(last) = batch.last() {
                self.next = last.seq + 1;
            }
            self.buffer.extend(batch);
        }
        Ok(())
    }

    /// The next event, waiting (blocking the thread) for it if need be; `None`
    /// when `timeout` passes first.
    pub fn next_blocking(&mut self, timeout: Duration) -> Result<Option<RecordedEvent>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.refill()?;
            if let Some(e) = self.buffer.pop_front() {
                return Ok(Some(e));
            }
            let shared = &self.log.shared;
            let guard = shared.head.lock().expect("head lock");
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if *guard < self.next {
                let _ = shared
                    .head_changed
                    .wait_timeout(guard, deadline - now)
                    .expect("head lock");
            }
        }
    }

    /// The next event, awaiting it if need be.
    pub async fn next(&mut self) -> Result<RecordedEvent> {
        loop {
            self.refill()?;
            if let Some(e) = self.buffer.pop_front() {
                return Ok(e);
            }
            let next = self.next;
            self.watch
                .wait_for(|head| *head >= next)
                .await
                .map_err(|_| StoreError::Closed)?;
        }
    }
}
