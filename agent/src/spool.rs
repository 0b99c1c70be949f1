//! The agent's on-disk log spool: every piece of job output is appended here first (masked,
//! numbered), sent from here, and trimmed only when the core acknowledges it as stored. A
//! dropped connection loses nothing: after a reconnect the agent rewinds to the position the
//! core names and sends again from the disk.
//!
//! Memory stays flat whatever the volume: records live in segment files of
//! [`SEGMENT_BYTES`]; the writer and the reader each hold one small buffer. The spool has a
//! size cap: past it, output is counted, not kept, and once there is room again one marker
//! line says how much was dropped (the build itself never stops for it).
//!
//! Record layout (little endian): `u32 data length, u64 seq, u8 stream, data`. The stream
//! byte's high bit says the piece is cut: the line goes on in the stream's next piece.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use stagely_protocol::LogStream;

/// Size at which a segment file is closed and a new one begun; acknowledged output is freed
/// a whole segment at a time.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Default cap on the spool's size on disk (`spool_max_bytes` in `agent.toml`).
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
const HEADER_BYTES: u64 = 4 + 8 + 1;
const IO_BUFFER: usize = 64 * 1024;
/// Most unsent output kept in memory as well as on disk (see [`Spool::keep_hot`]).
const HOT_BYTES: usize = 512 * 1024;
/// What a record kept in memory costs beyond its data.
const HOT_RECORD_OVERHEAD: usize = 64;

/// One spooled piece of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub stream: LogStream,
    pub data: String,
    /// The line goes on in the next piece of this stream (the agent cut it).
    pub continued: bool,
}

struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// Seq of the last record written to it (`first_seq - 1` while empty).
    last_seq: u64,
    bytes: u64,
}

struct Cursor {
    /// The segment being read, by its first seq.
    segment_first: u64,
    reader: BufReader<File>,
}

/// A bounded, append-only, acknowledged-trimmed log of one job's output.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segments: VecDeque<Segment>,
    writer: Option<BufWriter<File>>,
    unflushed: bool,
    /// Seq the next record gets.
    next_seq: u64,
    /// Seq of the next record to read (send).
    read_seq: u64,
    cursor: Option<Cursor>,
    acked: u64,
    bytes: u64,
    /// Data bytes of the records not yet sent (an upper bound after a rewind).
    unsent_bytes: u64,
    /// The newest unsent records, also in memory: consecutive, ending at the last written.
    hot: VecDeque<Record>,
    hot_bytes: usize,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl Spool {
    /// An empty spool in `dir` (created; anything there before is removed).
    pub fn create(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        crate::private_dir(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(2 * HEADER_BYTES + 1024),
            segments: VecDeque::new(),
            writer: None,
            unflushed: false,
            next_seq: 1,
            read_seq: 1,
            cursor: None,
            acked: 0,
            bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
            unsent_bytes: 0,
            hot: VecDeque::new(),
            hot_bytes: 0,
        })
    }

    /// Seq of the last record appended (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Highest seq the core acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether records remain to be sent.
    pub fn has_unsent(&self) -> bool {
        self.read_seq < self.next_seq
    }

    /// Records not yet sent, and their data bytes (after a rewind, at most that).
    pub fn unsent(&self) -> (u64, u64) {
        if self.has_unsent() {
            (self.next_seq - self.read_seq, self.unsent_bytes)
        } else {
            (0, 0)
        }
    }

    /// Output dropped because the spool was full and not yet reported by a marker line.
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_lines, self.dropped_bytes)
    }

    /// Appends one piece of output; returns its seq, or `None` when the spool is full (the
    /// piece is counted and a marker line follows once there is room).
    pub fn append(&mut self, stream: LogStream, data: &str) -> io::Result<Option<u64>> {
        self.append_owned(stream, Cow::Borrowed(data), false)
    }

    /// [`Spool::append`] of a piece the caller gives up (kept for sending without a copy);
    /// `continued`: the line goes on in the stream's next piece.
    pub fn append_owned(
        &mut self,
        stream: LogStream,
        data: Cow<'_, str>,
        continued: bool,
    ) -> io::Result<Option<u64>> {
        let need = HEADER_BYTES + data.len() as u64;
        if self.dropped_lines > 0 {
            let marker = self.marker();
            // The marker goes first, and only with room for it and this piece.
            if self.bytes + HEADER_BYTES + marker.len() as u64 + need > self.max_bytes {
                self.dropped_lines += 1;
                self.dropped_bytes += data.len() as u64;
                return Ok(None);
            }
            self.dropped_lines = 0;
            self.dropped_bytes = 0;
            self.write_record(LogStream::System, &marker, false)?;
            self.keep_hot(LogStream::System, Cow::Owned(marker), false);
        } else if self.bytes + need > self.max_bytes {
            self.dropped_lines = 1;
            self.dropped_bytes = data.len() as u64;
            return Ok(None);
        }
        let seq = self.write_record(stream, &data, continued)?;
        self.keep_hot(stream, data, continued);
        Ok(Some(seq))
    }

    /// Keeps the record just written in memory too, while every unsent record is there
    /// (the sender keeps up): it is then sent without reading it back from disk. Past
    /// [`HOT_BYTES`] the memory copy is dropped and reading goes to disk until it catches up.
    fn keep_hot(&mut self, stream: LogStream, data: Cow<'_, str>, continued: bool) {
        let seq = self.next_seq - 1;
        if self.hot.is_empty() && self.read_seq != seq {
            return;
        }
        let cost = data.len() + HOT_RECORD_OVERHEAD;
        if self.hot_bytes + cost > HOT_BYTES {
            self.hot.clear();
            self.hot_bytes = 0;
            return;
        }
        self.hot_bytes += cost;
        self.hot.push_back(Record {
            seq,
            stream,
            data: data.into_owned(),
            continued,
        });
    }

    /// Drops memory copies of records before `read_seq` (acknowledged without being read).
    fn trim_hot(&mut self) {
        while let Some(front) = self.hot.front()
            && front.seq < self.read_seq
        {
            self.hot_bytes -= front.data.len() + HOT_RECORD_OVERHEAD;
            self.hot.pop_front();
        }
    }

    /// Writes the marker of output still being dropped, if there is room (the job ended).
    pub fn close_dropped(&mut self) -> io::Result<()> {
        if self.dropped_lines == 0 {
            return Ok(());
        }
        let marker = self.marker();
        if self.bytes + HEADER_BYTES + marker.len() as u64 <= self.max_bytes + 1024 {
            self.dropped_lines = 0;
            self.dropped_bytes = 0;
            self.write_record(LogStream::System, &marker, false)?;
            self.keep_hot(LogStream::System, Cow::Owned(marker), false);
        }
        Ok(())
    }

    fn marker(&self) -> String {
        format!(
            "[stagely] {} bytes in {} pieces of output were dropped: the agent's spool reached its limit of {} bytes while the core was not taking output\n",
            self.dropped_bytes, self.dropped_lines, self.max_bytes
        )
    }

    fn write_record(&mut self, stream: LogStream, data: &str, continued: bool) -> io::Result<u64> {
        let roll = self
            .segments
            .back()
            .is_none_or(|segment| segment.bytes >= SEGMENT_BYTES);
        if roll {
            self.flush()?;
            let path = self.dir.join(format!("{:020}.spool", self.next_seq));
            let file = {
                use std::os::unix::fs::OpenOptionsExt;
                OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)?
            };
            self.writer = Some(BufWriter::with_capacity(IO_BUFFER, file));
            self.segments.push_back(Segment {
                path,
                first_seq: self.next_seq,
                last_seq: self.next_seq - 1,
                bytes: 0,
            });
        }
        let (Some(writer), Some(segment)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Err(io::Error::other("spool has no open segment"));
        };
        let seq = self.next_seq;
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("piece too long"))?;
        writer.write_all(&len.to_le_bytes())?;
        writer.write_all(&seq.to_le_bytes())?;
        writer.write_all(&[stream_code(stream) | if continued { CUT_BIT } else { 0 }])?;
        writer.write_all(data.as_bytes())?;
        let size = HEADER_BYTES + data.len() as u64;
        segment.bytes += size;
        segment.last_seq = seq;
        self.bytes += size;
        if !self.has_unsent() {
            self.unsent_bytes = 0;
        }
        self.unsent_bytes += data.len() as u64;
        self.next_seq += 1;
        self.unflushed = true;
        Ok(seq)
    }

    /// Hands what is buffered to the file (the job loop does after each turn of intake, so
    /// the disk holds every piece taken even while sending reads from memory).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.unflushed
            && let Some(writer) = self.writer.as_mut()
        {
            writer.flush()?;
        }
        self.unflushed = false;
        Ok(())
    }

    /// The core stored everything up to `seq`: whole segments at or below it are deleted.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        let seq = seq.min(self.last_seq());
        if seq <= self.acked {
            return Ok(());
        }
        self.acked = seq;
        // The segment being written is kept (it may be appended to), unless it is full.
        while let Some(front) = self.segments.front() {
            let is_current = self.segments.len() == 1 && front.bytes < SEGMENT_BYTES;
            if front.last_seq > seq || is_current || front.last_seq < front.first_seq {
                break;
            }
            if let Some(segment) = self.segments.pop_front() {
                if self.segments.is_empty() {
                    self.flush()?;
                    self.writer = None;
                }
                if self
                    .cursor
                    .as_ref()
                    .is_some_and(|cursor| cursor.segment_first == segment.first_seq)
                {
                    self.cursor = None;
                }
                self.bytes -= segment.bytes;
                std::fs::remove_file(&segment.path)?;
            }
        }
        if self.read_seq <= seq {
            self.read_seq = seq + 1;
            self.cursor = None;
            self.trim_hot();
        }
        Ok(())
    }

    /// The next read starts after `seq` (the core's stored position after a reconnect).
    pub fn rewind(&mut self, seq: u64) -> io::Result<()> {
        self.ack(seq)?;
        let from = (seq + 1).max(self.acked + 1);
        if from != self.read_seq {
            self.read_seq = from;
            self.cursor = None;
            // Not counted per record: everything on disk is an upper bound.
            self.unsent_bytes = self.bytes;
        }
        Ok(())
    }

    /// The next record to send, if any.
    pub fn next_unsent(&mut self) -> io::Result<Option<Record>> {
        if !self.has_unsent() {
            return Ok(None);
        }
        if self
            .hot
            .front()
            .is_some_and(|record| record.seq == self.read_seq)
            && let Some(record) = self.hot.pop_front()
        {
            // A disk cursor left behind skips forward past it when it is used again.
            self.hot_bytes -= record.data.len() + HOT_RECORD_OVERHEAD;
            self.read_seq = record.seq + 1;
            self.unsent_bytes = self.unsent_bytes.saturating_sub(record.data.len() as u64);
            return Ok(Some(record));
        }
        self.flush()?;
        loop {
            if self.cursor.is_none() {
                self.cursor = Some(self.open_at(self.read_seq)?);
            }
            let Some(cursor) = self.cursor.as_mut() else {
                return Ok(None);
            };
            match read_record(&mut cursor.reader)? {
                Some(record) if record.seq < self.read_seq => continue,
                Some(record) => {
                    self.read_seq = record.seq + 1;
                    self.unsent_bytes = self.unsent_bytes.saturating_sub(record.data.len() as u64);
                    return Ok(Some(record));
                }
                None => {
                    // End of this segment: the next one holds `read_seq`.
                    let last = self
                        .segments
                        .iter()
                        .find(|segment| segment.first_seq == cursor.segment_first)
                        .map(|segment| segment.last_seq);
                    match last {
                        Some(last) if last >= self.read_seq => {
                            return Err(io::Error::other(format!(
                                "spool segment ends before seq {}",
                                self.read_seq
                            )));
                        }
                        _ => self.cursor = None,
                    }
                }
            }
        }
    }

    fn open_at(&self, seq: u64) -> io::Result<Cursor> {
        let segment = self
            .segments
            .iter()
            .find(|segment| segment.first_seq <= seq && seq <= segment.last_seq)
            .ok_or_else(|| io::Error::other(format!("seq {seq} is not in the spool")))?;
        let mut file = File::open(&segment.path)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Cursor {
            segment_first: segment.first_seq,
            reader: BufReader::with_capacity(IO_BUFFER, file),
        })
    }

    /// Removes the spool's files.
    pub fn remove(self) -> io::Result<()> {
        drop(self.writer);
        std::fs::remove_dir_all(&self.dir)
    }
}

/// Set in a record's stream byte when the piece is cut (the line goes on).
const CUT_BIT: u8 = 0x80;

fn stream_code(stream: LogStream) -> u8 {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
        LogStream::System => 2,
    }
}

fn read_record(reader: &mut impl Read) -> io::Result<Option<Record>> {
    let mut header = [0u8; HEADER_BYTES as usize];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&header[4..12]);
    let seq = u64::from_le_bytes(seq_bytes);
    let continued = header[12] & CUT_BIT != 0;
    let stream = match header[12] & !CUT_BIT {
        0 => LogStream::Stdout,
        1 => LogStream::Stderr,
        _ => LogStream::System,
    };
    // Read into spare capacity: a zeroed buffer per record cost a memset and a calloc on the
    // path that sends a backlog from disk.
    let mut data = Vec::with_capacity(len);
    Read::take(&mut *reader, len as u64).read_to_end(&mut data)?;
    if data.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "spool record cut short",
        ));
    }
    let data = String::from_utf8(data).map_err(|_| io::Error::other("spool record not UTF-8"))?;
    Ok(Some(Record {
        seq,
        stream,
        data,
        continued,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(spool: &mut Spool) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(record) = spool.next_unsent().unwrap() {
            out.push(record);
        }
        out
    }

    /// A cut piece keeps its flag in memory and on disk (after a rewind), per stream.
    #[test]
    fn the_cut_flag_survives_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(&dir.path().join("s"), DEFAULT_MAX_BYTES).unwrap();
        for (stream, data, continued) in [
            (LogStream::Stderr, "abc", true),
            (LogStream::Stderr, "def\n", false),
            (LogStream::System, "x", true),
            (LogStream::Stdout, "y\n", false),
        ] {
            spool
                .append_owned(stream, Cow::Borrowed(data), continued)
                .unwrap();
        }
        let flags = |records: Vec<Record>| {
            records
                .into_iter()
                .map(|r| (r.stream, r.data, r.continued))
                .collect::<Vec<_>>()
        };
        let hot = flags(drain(&mut spool));
        spool.flush().unwrap();
        spool.rewind(0).unwrap();
        let cold = flags(drain(&mut spool));
        assert_eq!(hot, cold);
        assert_eq!(
            cold,
            [
                (LogStream::Stderr, "abc".to_string(), true),
                (LogStream::Stderr, "def\n".to_string(), false),
                (LogStream::System, "x".to_string(), true),
                (LogStream::Stdout, "y\n".to_string(), false),
            ]
        );
    }

    #[test]
    fn records_come_back_in_order_and_a_rewind_resends_from_the_named_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(&dir.path().join("s"), DEFAULT_MAX_BYTES).unwrap();
        for i in 1..=10 {
            assert_eq!(
                spool
                    .append(LogStream::Stdout, &format!("line {i}\n"))
                    .unwrap(),
                Some(i)
            );
        }
        // "line 1\n" .. "line 9\n" are 7 bytes, "line 10\n" 8.
        assert_eq!(spool.unsent(), (10, 9 * 7 + 8));
        let first = drain(&mut spool);
        assert_eq!(spool.unsent(), (0, 0));
        assert_eq!(first.len(), 10);
        assert_eq!(first[9].data, "line 10\n");
        // Interleaved appends and reads.
        spool.append(LogStream::Stderr, "late\n").unwrap();
        assert_eq!(drain(&mut spool)[0].stream, LogStream::Stderr);
        // The core stored up to 4: everything after is sent again.
        spool.rewind(4).unwrap();
        assert_eq!(spool.unsent().0, 7);
        assert!(spool.unsent().1 >= 5 * 7 + 8 + 5);
        let again = drain(&mut spool);
        assert_eq!(
            again.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (5..=11).collect::<Vec<_>>()
        );
    }

    #[test]
    fn reads_move_between_memory_and_disk_without_losing_or_repeating_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(&dir.path().join("s"), DEFAULT_MAX_BYTES).unwrap();
        let line = |seq: u64| format!("{seq:08} {}\n", "y".repeat(1000));
        let mut written = 0u64;
        let mut read = Vec::new();
        let take = |spool: &mut Spool, n: usize, read: &mut Vec<u64>| {
            for _ in 0..n {
                match spool.next_unsent().unwrap() {
                    Some(record) => {
                        assert_eq!(record.data, line(record.seq));
                        read.push(record.seq);
                    }
                    None => break,
                }
            }
        };
        // Kept up with (memory), then a backlog past HOT_BYTES (disk), caught up again.
        for round in 0..40u64 {
            let burst = if round % 10 == 9 { 3000 } else { 50 };
            for _ in 0..burst {
                written += 1;
                spool.append(LogStream::Stdout, &line(written)).unwrap();
            }
            take(
                &mut spool,
                if round % 10 == 9 { 700 } else { 400 },
                &mut read,
            );
            if round == 25 {
                // A reconnect: the core stored less than was read.
                let stored = read[read.len() / 2];
                spool.rewind(stored).unwrap();
                read.retain(|seq| *seq <= stored);
            }
            if round % 7 == 0 && !read.is_empty() {
                spool.ack(read[read.len() - 1] / 2).unwrap();
            }
        }
        take(&mut spool, usize::MAX, &mut read);
        assert_eq!(read, (1..=written).collect::<Vec<_>>());
        assert!(spool.hot_bytes <= HOT_BYTES);
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_reading_crosses_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(&dir.path().join("s"), DEFAULT_MAX_BYTES).unwrap();
        let piece = "x".repeat(64 * 1024 - 1) + "\n";
        let count = (3 * SEGMENT_BYTES / piece.len() as u64) + 5;
        for _ in 0..count {
            spool.append(LogStream::Stdout, &piece).unwrap();
        }
        let files = || std::fs::read_dir(dir.path().join("s")).unwrap().count();
        assert_eq!(files(), 4);
        let all = drain(&mut spool);
        assert_eq!(all.len() as u64, count);
        assert!(all.iter().all(|r| r.data == piece));
        spool.ack(count - 1).unwrap();
        assert_eq!(files(), 1, "only the segment being written stays");
        assert!(spool.bytes() < SEGMENT_BYTES);
        // A rewind to an acknowledged position cannot go behind the ACK.
        spool.rewind(0).unwrap();
        assert_eq!(drain(&mut spool).len(), 1);
    }

    #[test]
    fn a_full_spool_drops_and_says_so_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(&dir.path().join("s"), 2 * SEGMENT_BYTES).unwrap();
        let piece = "y".repeat(1023) + "\n";
        let mut kept = 0u64;
        let mut dropped = 0u64;
        for _ in 0..(3 * SEGMENT_BYTES / 1024) {
            match spool.append(LogStream::Stdout, &piece).unwrap() {
                Some(_) => kept += 1,
                None => dropped += 1,
            }
        }
        assert!(dropped > 0 && kept > 0);
        assert!(spool.bytes() <= 2 * SEGMENT_BYTES);
        assert_eq!(spool.dropped().0, dropped);
        // The core takes everything: room again, and the next piece is preceded by a marker.
        let last = spool.last_seq();
        drain(&mut spool);
        spool.ack(last).unwrap();
        let seq = spool.append(LogStream::Stdout, "after\n").unwrap().unwrap();
        let tail = drain(&mut spool);
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].stream, LogStream::System);
        assert!(
            tail[0]
                .data
                .contains(&format!("{} bytes in {dropped} pieces", dropped * 1024)),
            "{}",
            tail[0].data
        );
        assert_eq!(tail[1].seq, seq);
        assert_eq!(tail[1].data, "after\n");
    }
}
