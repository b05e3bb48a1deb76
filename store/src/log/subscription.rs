//! Following the log: a reader that sees every committed event once, in
//! order, never one that is not durable.

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
