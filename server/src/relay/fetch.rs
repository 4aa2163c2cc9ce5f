//! How a `Fetch` reads a page: never more than its byte budget and one
//! envelope from the store.

use haven_store::{StoreError, StoredEnvelope};

/// Reads up to `limit` envelopes, stopping before their payloads pass
/// `budget` bytes (the first always goes), and says whether more are stored.
///
/// `list(after, count)` is the store's listing. It is asked in chunks of as
/// many envelopes as the budget left could hold at `max_envelope` bytes each,
/// plus one: a chunk reads at most that remainder and one envelope, so the
/// whole Fetch reads at most `budget + max_envelope` bytes (and decrypts, on
/// sled and Redis, only those). Before, it read `limit + 1` envelopes and then
/// cut at the budget: 101 × 64 KiB decrypted for the 16 that fit 1 MiB.
/// Small envelopes take more chunks: about `(limit + 1) / (budget /
/// max_envelope)` store calls, rounded up (7 with the defaults, 63 at the
/// largest `max_fetch`).
pub async fn page<Listing>(
    mut list: impl FnMut(Option<u64>, usize) -> Listing,
    limit: usize,
    budget: u64,
    max_envelope: u64,
) -> Result<(Vec<StoredEnvelope>, bool), StoreError>
where
    Listing: Future<Output = Result<Vec<StoredEnvelope>, StoreError>>,
{
    let mut page: Vec<StoredEnvelope> = Vec::new();
    let mut bytes = 0u64;
    loop {
        let remaining = budget.saturating_sub(bytes);
        let room = usize::try_from(remaining / max_envelope.max(1)).unwrap_or(usize::MAX);
        // One more than the page still takes, to know whether more are stored.
        let count = room
            .saturating_add(1)
            .min(limit.saturating_sub(page.len()).saturating_add(1));
        let after = page.last().map(|envelope| envelope.seq);
        let chunk = list(after, count).await?;
        let exhausted = chunk.len() < count;
        for envelope in chunk {
            let size = envelope.payload.len() as u64;
            let fits = page.is_empty() || bytes.saturating_add(size) <= budget;
            if !fits || page.len() == limit {
                return Ok((page, true));
            }
            bytes = bytes.saturating_add(size);
            page.push(envelope);
        }
        if exhausted {
            return Ok((page, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_store::EnvelopeId;

    /// `count` envelopes of `size` bytes, and what a listing of them read.
    struct Mailbox {
        envelopes: Vec<StoredEnvelope>,
        read_bytes: u64,
        calls: usize,
    }

    impl Mailbox {
        fn new(sizes: &[usize]) -> Self {
            let envelopes = sizes
                .iter()
                .enumerate()
                .map(|(index, size)| StoredEnvelope {
                    seq: index as u64 + 1,
                    id: EnvelopeId::from_bytes([index as u8; 16]),
                    expires_at: 0,
                    payload: vec![0; *size],
                })
                .collect();
            Self {
                envelopes,
                read_bytes: 0,
                calls: 0,
            }
        }

        async fn page(&mut self, limit: usize, budget: u64, max: u64) -> (Vec<u64>, bool) {
            let (page, more) = page(
                |after: Option<u64>, count| {
                    self.calls += 1;
                    let listed: Vec<StoredEnvelope> = self
                        .envelopes
                        .iter()
                        .filter(|envelope| after.is_none_or(|after| envelope.seq > after))
                        .take(count)
                        .cloned()
                        .collect();
                    self.read_bytes += listed.iter().map(|e| e.payload.len() as u64).sum::<u64>();
                    std::future::ready(Ok(listed))
                },
                limit,
                budget,
                max,
            )
            .await
            .unwrap();
            (page.iter().map(|envelope| envelope.seq).collect(), more)
        }
    }

    const KIB: u64 = 1024;

    #[tokio::test]
    async fn a_fetch_of_large_envelopes_reads_no_more_than_its_budget_and_one_envelope() {
        let mut mailbox = Mailbox::new(&[64 * 1024; 101]);
        let (page, more) = mailbox.page(100, 1024 * KIB, 64 * KIB).await;
        assert_eq!(page, (1..=16).collect::<Vec<_>>());
        assert!(more);
        assert!(
            mailbox.read_bytes <= 1024 * KIB + 64 * KIB,
            "read {} bytes for a 1 MiB page",
            mailbox.read_bytes
        );
    }

    #[tokio::test]
    async fn small_envelopes_fill_the_limit_in_few_store_calls() {
        let mut mailbox = Mailbox::new(&[100; 250]);
        let (page, more) = mailbox.page(100, 1024 * KIB, 64 * KIB).await;
        assert_eq!(page, (1..=100).collect::<Vec<_>>());
        assert!(more);
        assert!(mailbox.calls <= 7, "{} store calls", mailbox.calls);
        // Exactly the limit stored: no `more`.
        let mut mailbox = Mailbox::new(&[100; 100]);
        assert!(!mailbox.page(100, 1024 * KIB, 64 * KIB).await.1);
        let mut empty = Mailbox::new(&[]);
        assert_eq!(empty.page(100, 1024 * KIB, 64 * KIB).await, (vec![], false));
    }

    #[tokio::test]
    async fn mixed_sizes_stop_at_the_budget_and_the_first_always_goes() {
        // 40 + 40 + 40 KiB against a 100 KiB budget: two fit.
        let mut mailbox = Mailbox::new(&[40 * 1024, 40 * 1024, 40 * 1024, 10]);
        assert_eq!(
            mailbox.page(10, 100 * KIB, 64 * KIB).await,
            (vec![1, 2], true)
        );
        // A page of one when the first alone is the budget.
        let mut mailbox = Mailbox::new(&[64 * 1024, 1]);
        assert_eq!(mailbox.page(10, 64 * KIB, 64 * KIB).await, (vec![1], true));
        assert_eq!(mailbox.page(1, 64 * KIB, 64 * KIB).await, (vec![1], true));
        let mut single = Mailbox::new(&[5]);
        assert_eq!(single.page(1, 64 * KIB, 64 * KIB).await, (vec![1], false));
    }
}
