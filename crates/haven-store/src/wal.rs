//! The sled backend's write-ahead log: what makes a mutation durable.
//!
//! Every batch a mutation applies to the sled tree is also appended here, and a
//! mutation is answered once its record has been written and `fdatasync`ed. One
//! write and one sync cover every batch applied since the last one (group
//! commit), from one thread, which is far cheaper than sled's own `flush`: that
//! one hands the write to sled's IO threads and waits for them, and contends
//! with the writers while it runs (measured with `haven-bench throughput`; see
//! BENCHMARKS.md).
//!
//! Each batch also writes its sequence number into the tree under [`META_KEY`].
//! sled may persist batches on its own (when an IO buffer fills), so after a
//! crash the tree holds some prefix of the batches, possibly longer than the
//! log's; it tells which one. Recovery replays, in order, exactly the logged
//! batches after it. Batches are blind writes of whole values, so the result is
//! the state after the last logged batch, or after sled's own, whichever is
//! later: every answered mutation is in it, and nothing is half-applied.
//!
//! Two files, `wal-0` and `wal-1`, used in turn and overwritten in place (after
//! their first use, a write needs no new blocks, which makes the sync cheaper).
//! Before the log switches files, sled is flushed, so everything in the file it
//! switches to is already in the tree. Records:
//!
//! ```text
//! length of body (u32 LE) ‖ CRC-32 of body (u32 LE) ‖ body
//! body = sequence number (u64 LE) ‖ { 1 ‖ key length (u32 LE) ‖ key ‖ value length (u32 LE) ‖ value
//!                                   | 0 ‖ key length (u32 LE) ‖ key }*
//! ```
//!
//! The log is also emptied at every expiry sweep (a checkpoint: sled flushed and
//! synced first), so on a quiet relay records of deleted mailboxes and
//! acknowledged envelopes stay in it at most one sweep interval, and on a busy
//! one no longer than that or until their file is reused.
//!
//! A file is read up to its first record that is torn, fails its CRC, or does
//! not continue the sequence (the stale tail of an earlier use of the file).
//! CRC-32 detects torn and stale writes, not tampering: whoever can write the
//! data directory can write the tree as well.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sled::IVec;

/// Tree key of the sequence number of the last batch applied. Every other key
/// starts with an ASCII letter, so it cannot collide.
pub(crate) const META_KEY: &[u8] = b"\x00wal-seq";

/// A file is left for the other once it holds this much. At the relay's full
/// rate (about 12 MiB/s of 1 KiB envelopes) that is a switch, and so a sled
/// flush, every few seconds; small enough that replay after a crash is quick.
const FILE_LIMIT: u64 = 32 * 1024 * 1024;

/// A record's length and CRC.
const HEADER_LEN: usize = 8;

/// One write of a batch: a value to insert, or `None` to remove the key.
pub(crate) type Op = (Vec<u8>, Option<IVec>);

/// A batch read back from the log.
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) ops: Vec<Op>,
}

/// Appends `seq` and `ops` as one record to `out`.
pub(crate) fn encode(seq: u64, ops: &[Op], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.extend_from_slice(&seq.to_le_bytes());
    for (key, value) in ops {
        out.push(u8::from(value.is_some()));
        put_bytes(out, key);
        if let Some(value) = value {
            put_bytes(out, value);
        }
    }
    let body_len = out.len() - start - HEADER_LEN;
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    // Lengths are bounded by the relay's envelope limit, far below 4 GiB.
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The log: the file being written and where.
pub(crate) struct Wal {
    files: [File; 2],
    current: usize,
    offset: u64,
}

fn path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("wal-{index}"))
}

impl Wal {
    /// Opens (or creates) both files in `dir` and reads every intact record,
    /// in sequence order. Writing starts at the beginning of `wal-0`: call
    /// this only once the records have been replayed and the tree flushed.
    pub(crate) fn open(dir: &Path) -> io::Result<(Self, Vec<Record>)> {
        let mut records = Vec::new();
        let mut files = Vec::with_capacity(2);
        for index in 0..2 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path(dir, index))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            records.extend(decode_file(&bytes));
            files.push(file);
        }
        // The files' directory entries must survive a power cut too.
        File::open(dir)?.sync_all()?;
        records.sort_by_key(|record| record.seq);
        let [first, second]: [File; 2] = files
            .try_into()
            .map_err(|_| io::Error::other("two log files expected"))?;
        Ok((
            Self {
                files: [first, second],
                current: 0,
                offset: 0,
            },
            records,
        ))
    }

    /// Whether the current file is full, so that the next write should go to
    /// the other one, after a sled flush (see [`Wal::switch`]).
    pub(crate) fn full(&self) -> bool {
        self.offset >= FILE_LIMIT
    }

    /// Continues in the other file, from its beginning. The caller must have
    /// flushed the tree after applying every batch logged so far.
    pub(crate) fn switch(&mut self) {
        self.current = 1 - self.current;
        self.offset = 0;
    }

    /// Writes `bytes` (whole records) and syncs them.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let file = &self.files[self.current];
        file.write_all_at(bytes, self.offset)?;
        file.sync_data()?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Empties both files and starts over at the beginning of `wal-0`. Only
    /// once the tree holds, durably, everything logged (a checkpoint, or a
    /// clean shutdown).
    pub(crate) fn clear(&mut self) -> io::Result<()> {
        for file in &self.files {
            file.set_len(0)?;
            file.sync_all()?;
        }
        self.current = 0;
        self.offset = 0;
        Ok(())
    }
}

/// The intact records at the start of one file, in order.
fn decode_file(bytes: &[u8]) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    let mut rest = bytes;
    while let Some((record, tail)) = decode_record(rest) {
        if let Some(last) = records.last()
            && last.seq.checked_add(1) != Some(record.seq)
        {
            // The stale tail of the file's previous use.
            break;
        }
        records.push(record);
        rest = tail;
    }
    records
}

fn decode_record(bytes: &[u8]) -> Option<(Record, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let body = bytes.get(HEADER_LEN..HEADER_LEN.checked_add(len)?)?;
    if len < 8 || crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let mut ops = Vec::new();
    let mut cursor = &body[8..];
    while let Some((&tag, tail)) = cursor.split_first() {
        let (key, tail) = take_bytes(tail)?;
        let (value, tail) = match tag {
            0 => (None, tail),
            1 => {
                let (value, tail) = take_bytes(tail)?;
                (Some(IVec::from(value)), tail)
            }
            _ => return None,
        };
        ops.push((key.to_vec(), value));
        cursor = tail;
    }
    Some((Record { seq, ops }, &bytes[HEADER_LEN + len..]))
}

fn take_bytes(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let value = bytes.get(4..4usize.checked_add(len)?)?;
    Some((value, &bytes[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(n: u8) -> Vec<Op> {
        vec![
            (vec![b'e', n], Some(IVec::from(vec![n; 100]))),
            (vec![b'i', n], None),
        ]
    }

    #[test]
    fn records_round_trip_and_stop_at_a_torn_tail() {
        let mut bytes = Vec::new();
        for seq in 1..=3 {
            encode(seq, &ops(seq as u8), &mut bytes);
        }
        let whole = decode_file(&bytes);
        assert_eq!(whole.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(whole[1].ops, ops(2));
        // Any cut inside the last record leaves the first two.
        let mut two = Vec::new();
        encode(1, &ops(1), &mut two);
        encode(2, &ops(2), &mut two);
        for cut in two.len()..bytes.len() {
            assert_eq!(decode_file(&bytes[..cut]).len(), 2, "cut at {cut}");
        }
        // A flipped bit anywhere in the second record ends the file after the first.
        let first_len = {
            let mut one = Vec::new();
            encode(1, &ops(1), &mut one);
            one.len()
        };
        for at in first_len..two.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x10;
            assert_eq!(decode_file(&corrupt).len(), 1, "flip at {at}");
        }
    }

    #[test]
    fn a_stale_tail_from_an_earlier_use_is_not_read() {
        let mut old = Vec::new();
        for seq in 1..=5 {
            encode(seq, &ops(seq as u8), &mut old);
        }
        // The file is reused from its start for records 9 and 10; the old
        // records 3 to 5 still follow them.
        let mut new = Vec::new();
        encode(9, &ops(9), &mut new);
        encode(10, &ops(10), &mut new);
        let mut reused = old.clone();
        reused[..new.len()].copy_from_slice(&new);
        let records = decode_file(&reused);
        assert!(records.iter().all(|r| r.seq >= 9), "stale records read");
        assert!(!records.is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode_file(&bytes);
        }
        let _ = decode_file(&[0xff; 16]);
    }
}
