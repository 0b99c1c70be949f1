//! Log chunks: many lines per row (`log_chunks`), so storing a chatty build costs one insert
//! per batch, not one per line.
//!
//! A chunk is text, so the database holds lines as readable as before: per line a header
//! `SEQ STREAM LEN\n` (`STREAM` is `o`, `e` or `s`, upper case for a piece of a cut line that
//! goes on in the stream's next piece; `LEN` the byte length of the data) and
//! then exactly `LEN` bytes of data. Seqs ascend within a chunk (gaps allowed: lines past a
//! job's log cap are counted, not stored) and chunks of one job never overlap.

use super::{LogRow, NewLogLine};

/// Largest chunk text written in one row; a bigger batch becomes several chunks.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;

/// The lines of `lines` to store after `stored`: ascending and above it only (a line at or
/// below the highest seq kept so far is dropped).
pub fn fresh_lines(lines: &[NewLogLine], stored: i64) -> Vec<&NewLogLine> {
    let mut last = stored;
    lines
        .iter()
        .filter(|line| {
            let keep = line.seq > last;
            if keep {
                last = line.seq;
            }
            keep
        })
        .collect()
}

/// [`encode`], each chunk packed where that pays ([`pack`]): a chatty build's log is mostly
/// repeats.
pub fn prepare(lines: &[&NewLogLine]) -> Vec<Chunk> {
    let mut chunks = encode(lines);
    for chunk in &mut chunks {
        chunk.packed = pack(&chunk.text);
        if chunk.packed.is_some() {
            chunk.text = String::new();
        }
    }
    chunks
}

/// Most bytes a packed chunk may unpack to: a chunk is at most [`MAX_CHUNK_BYTES`] (or one
/// line, far shorter, with its header); a packed value claiming more is damaged, and is not
/// given the memory it asks for.
const MAX_UNPACKED_BYTES: usize = 2 * MAX_CHUNK_BYTES;

/// A chunk's text packed for storage (column `packed`): its length (4 bytes, little endian)
/// and then an LZ4 block. `None` when packing saves less than an eighth (it is stored as text
/// then: not worth unpacking on every read). A chatty build's output is mostly repeats: packed, it costs the database (its
/// writes, its write-ahead log, its checkpoints, its disk) a fraction of the bytes.
pub fn pack(text: &str) -> Option<Vec<u8>> {
    let worth = |packed: usize, of: usize| packed <= of - of / 8;
    // Output that does not shrink (base64, hashes, compressed data printed as text) costs only
    // a trial on its first bytes, not a whole compression per chunk.
    if text.len() > 2 * PACK_PROBE_BYTES {
        let probe = &text.as_bytes()[..PACK_PROBE_BYTES];
        if !worth(lz4_flex::compress(probe).len(), probe.len()) {
            return None;
        }
    }
    let packed = lz4_flex::compress_prepend_size(text.as_bytes());
    worth(packed.len(), text.len()).then_some(packed)
}

/// How much of a large chunk [`pack`] tries first.
const PACK_PROBE_BYTES: usize = 64 * 1024;

/// The text of a packed chunk ([`pack`]).
pub fn unpack(job_id: &str, first_seq: i64, packed: &[u8]) -> Result<String, ChunkError> {
    let damaged = || ChunkError {
        job_id: job_id.to_string(),
        first_seq,
        at: 0,
    };
    let (size, block) = packed.split_first_chunk::<4>().ok_or_else(damaged)?;
    let size = u32::from_le_bytes(*size) as usize;
    if size > MAX_UNPACKED_BYTES {
        return Err(damaged());
    }
    let bytes = lz4_flex::block::decompress(block, size).map_err(|_| damaged())?;
    String::from_utf8(bytes).map_err(|_| damaged())
}

/// A stored chunk that does not parse (a bug or a damaged row), named for the error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log chunk of job {job_id} starting at seq {first_seq} is damaged at byte {at}")]
pub struct ChunkError {
    pub job_id: String,
    pub first_seq: i64,
    pub at: usize,
}

/// One chunk ready to insert: its text in `text`, or (then `text` is empty) packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub first_seq: i64,
    pub last_seq: i64,
    pub line_count: i64,
    /// Bytes of line data (without the headers).
    pub bytes: i64,
    pub text: String,
    /// The text LZ4-packed ([`pack`]), when [`prepare`] found that it pays.
    pub packed: Option<Vec<u8>>,
}

fn stream_code(stream: &str, continued: bool) -> char {
    let code = match stream {
        "stdout" => 'o',
        "stderr" => 'e',
        _ => 's',
    };
    if continued {
        code.to_ascii_uppercase()
    } else {
        code
    }
}

/// The stream of a header's code, and whether the line goes on.
fn stream_name(code: &str) -> Option<(&'static str, bool)> {
    match code {
        "o" => Some(("stdout", false)),
        "e" => Some(("stderr", false)),
        "s" => Some(("system", false)),
        "O" => Some(("stdout", true)),
        "E" => Some(("stderr", true)),
        "S" => Some(("system", true)),
        _ => None,
    }
}

/// Longest line header: two 20-digit numbers, the stream code, two spaces and a newline.
const MAX_HEADER_BYTES: usize = 44;

/// Packs ascending lines into chunks of at most [`MAX_CHUNK_BYTES`] (a single line longer
/// than that still gets a chunk of its own). Each chunk's text is allocated once, at the size
/// its lines need at most (a chunk that grew by doubling would copy itself on every step).
pub fn encode(lines: &[&NewLogLine]) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut rest = lines;
    while let Some(first) = rest.first() {
        let (count, capacity) = chunk_extent(rest);
        let (these, after) = rest.split_at(count);
        rest = after;
        let mut chunk = Chunk {
            first_seq: first.seq,
            last_seq: first.seq,
            line_count: 0,
            bytes: 0,
            text: String::with_capacity(capacity),
            packed: None,
        };
        for line in these {
            // `SEQ STREAM LEN\n` then the data (itoa: this runs for every stored line).
            let mut number = itoa::Buffer::new();
            chunk.text.push_str(number.format(line.seq));
            chunk.text.push(' ');
            chunk.text.push(stream_code(line.stream, line.continued));
            chunk.text.push(' ');
            chunk.text.push_str(number.format(line.line.len()));
            chunk.text.push('\n');
            chunk.text.push_str(&line.line);
            chunk.last_seq = line.seq;
            chunk.line_count += 1;
            chunk.bytes += line.line.len() as i64;
        }
        chunks.push(chunk);
    }
    chunks
}

/// The chunk that starts with `lines[0]`: how many lines it takes (as many as fit in
/// [`MAX_CHUNK_BYTES`], always the first) and its size at most, each header at its longest.
fn chunk_extent(lines: &[&NewLogLine]) -> (usize, usize) {
    let mut total = 0;
    let mut count = 0;
    for line in lines {
        let size = MAX_HEADER_BYTES + line.line.len();
        if count > 0 && total + size > MAX_CHUNK_BYTES {
            break;
        }
        total += size;
        count += 1;
    }
    (count, total)
}

/// The lines of a chunk with `seq > after`, stamped `stored_at`.
pub fn decode(
    job_id: &str,
    first_seq: i64,
    text: &str,
    stored_at: i64,
    after: i64,
) -> Result<Vec<LogRow>, ChunkError> {
    let damaged = |at: usize| ChunkError {
        job_id: job_id.to_string(),
        first_seq,
        at,
    };
    let mut rows = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        let header_end = rest.find('\n').ok_or_else(|| damaged(at))?;
        let mut fields = rest[..header_end].split(' ');
        let (Some(seq), Some(stream), Some(len), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(damaged(at));
        };
        let seq: i64 = seq.parse().map_err(|_| damaged(at))?;
        let (stream, continued) = stream_name(stream).ok_or_else(|| damaged(at))?;
        let len: usize = len.parse().map_err(|_| damaged(at))?;
        let start = at + header_end + 1;
        let end = start.checked_add(len).ok_or_else(|| damaged(at))?;
        let line = text.get(start..end).ok_or_else(|| damaged(at))?;
        if seq > after {
            rows.push(LogRow {
                seq,
                timestamp: stored_at,
                stream: stream.to_string(),
                line: line.to_string(),
                continued,
            });
        }
        at = end;
    }
    Ok(rows)
}

/// `len` pseudo-random hex digits from `seed` (a linear congruential generator's high bits):
/// text LZ4 finds next to nothing to repeat in.
#[cfg(test)]
pub(crate) fn random_hex_for_tests(seed: u64, len: usize) -> String {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut out = String::with_capacity(len + 8);
    while out.len() < len {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        out.push_str(&format!("{:08x}", state >> 32));
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: i64, stream: &'static str, text: &str) -> NewLogLine {
        NewLogLine {
            seq,
            stream,
            line: text.to_string(),
            continued: false,
        }
    }

    #[test]
    fn lines_come_back_exactly_whatever_they_hold() {
        let cut = |seq, stream, text: &str| NewLogLine {
            continued: true,
            ..line(seq, stream, text)
        };
        let lines = vec![
            line(3, "stdout", "plain\n"),
            line(4, "stderr", "two\nlines and a 5 e 12 fake header\n"),
            line(7, "system", ""),
            line(8, "stdout", "no newline, é ünïcode"),
            // Pieces of cut lines, and a line that only prints the old in-band marker.
            cut(9, "stdout", "abc"),
            cut(10, "stderr", ""),
            cut(11, "system", "s"),
            line(
                12,
                "stdout",
                "x [stagely: long line split, continued in the next line]\n",
            ),
        ];
        let chunks = encode(&lines.iter().collect::<Vec<_>>());
        assert_eq!(chunks.len(), 1);
        let chunk = &chunks[0];
        assert_eq!(
            (chunk.first_seq, chunk.last_seq, chunk.line_count),
            (3, 12, 8)
        );
        let rows = decode("j", 3, &chunk.text, 99, 0).unwrap();
        assert_eq!(rows.len(), 8);
        for (row, line) in rows.iter().zip(&lines) {
            assert_eq!(row.seq, line.seq);
            assert_eq!(row.stream, line.stream);
            assert_eq!(row.line, line.line);
            assert_eq!(row.continued, line.continued, "seq {}", line.seq);
            assert_eq!(row.timestamp, 99);
        }
        // Only what follows `after`.
        let tail = decode("j", 3, &chunk.text, 99, 8).unwrap();
        assert_eq!(
            tail.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![9, 10, 11, 12]
        );
    }

    #[test]
    fn packed_chunks_unpack_exactly_and_only_what_shrinks_is_packed() {
        let text = "1 o 100\n".to_string() + &"x".repeat(100);
        let text = text.repeat(5000);
        let packed = pack(&text).expect("repeats shrink");
        assert!(packed.len() * 50 < text.len(), "{} bytes", packed.len());
        assert_eq!(unpack("j", 1, &packed).unwrap(), text);
        // Too short to shrink: stored as text.
        assert_eq!(pack("1 o 3\nab\n"), None);
        // A large chunk whose start does not shrink is not packed at all (random hex: LZ4
        // finds next to nothing to repeat).
        let noise = random_hex_for_tests(1, 4 * PACK_PROBE_BYTES);
        assert_eq!(pack(&noise), None);
        let mixed = noise.clone() + &text;
        assert_eq!(pack(&mixed), None, "judged by its start");
        // Damage is named, and a claimed size past any chunk's is refused before allocating.
        let mut bogus = packed.clone();
        bogus[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = unpack("j", 7, &bogus).unwrap_err();
        assert_eq!(
            error.to_string(),
            "log chunk of job j starting at seq 7 is damaged at byte 0"
        );
        assert!(unpack("j", 1, &packed[..packed.len() / 2]).is_err());
        assert!(unpack("j", 1, &[1, 2]).is_err());
    }

    #[test]
    fn fresh_lines_are_ascending_and_above_what_is_stored() {
        let lines = vec![
            line(3, "stdout", "a\n"),
            line(5, "stdout", "b\n"),
            line(4, "stdout", "late\n"),
            line(6, "stdout", "c\n"),
        ];
        let seqs =
            |stored| -> Vec<i64> { fresh_lines(&lines, stored).iter().map(|l| l.seq).collect() };
        assert_eq!(seqs(0), [3, 5, 6]);
        assert_eq!(seqs(4), [5, 6]);
        assert_eq!(seqs(6), Vec::<i64>::new());
        let prepared = prepare(&fresh_lines(&lines, 0));
        assert_eq!(prepared.len(), 1);
        assert_eq!((prepared[0].first_seq, prepared[0].last_seq), (3, 6));
        assert_eq!(prepared[0].packed, None, "too short to pay");
        assert_eq!(prepared[0].text, "3 o 2\na\n5 o 2\nb\n6 o 2\nc\n");
    }

    #[test]
    fn big_batches_are_split_and_damage_is_named() {
        let big = "x".repeat(100_000);
        let lines: Vec<NewLogLine> = (1..=25).map(|seq| line(seq, "stdout", &big)).collect();
        let chunks = encode(&lines.iter().collect::<Vec<_>>());
        assert!(chunks.len() >= 3);
        assert!(chunks.iter().all(|c| c.text.len() <= MAX_CHUNK_BYTES));
        // Each chunk's text was allocated once, at its size (a regrown one doubles).
        assert!(chunks.iter().all(|c| c.text.capacity() <= MAX_CHUNK_BYTES));
        let seqs: Vec<i64> = chunks
            .iter()
            .flat_map(|c| decode("j", c.first_seq, &c.text, 0, 0).unwrap())
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
        let error = decode("j", 1, "1 o 50\nshort", 0, 0).unwrap_err();
        assert_eq!(error.at, 0);
        assert!(decode("j", 1, "1 q 1\nx", 0, 0).is_err());
    }
}
