//! FastCGI 1.0 records: the wire format, decoded without trusting the peer.
//!
//! Every length comes from the peer, so every length is checked before it
//! is used: a record's content is at most 65,535 bytes and its padding at
//! most 255 by construction (16 and 8 bit fields), and a name-value pair
//! may not claim more bytes than its record holds. Decoding never panics
//! and never buffers more than one record.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// The protocol version this crate speaks.
pub(crate) const VERSION_1: u8 = 1;
/// Header size, fixed by the spec.
pub(crate) const HEADER_LEN: usize = 8;
/// The largest content one record can carry.
pub(crate) const MAX_CONTENT: usize = u16::MAX as usize;

pub(crate) const BEGIN_REQUEST: u8 = 1;
pub(crate) const ABORT_REQUEST: u8 = 2;
pub(crate) const END_REQUEST: u8 = 3;
pub(crate) const PARAMS: u8 = 4;
pub(crate) const STDIN: u8 = 5;
pub(crate) const STDOUT: u8 = 6;
pub(crate) const DATA: u8 = 8;
pub(crate) const GET_VALUES: u8 = 9;
pub(crate) const GET_VALUES_RESULT: u8 = 10;
pub(crate) const UNKNOWN_TYPE: u8 = 11;

pub(crate) const ROLE_RESPONDER: u16 = 1;
pub(crate) const FLAG_KEEP_CONN: u8 = 1;

/// `protocolStatus` of `FCGI_END_REQUEST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProtocolStatus {
    RequestComplete = 0,
    CantMpxConn = 1,
    Overloaded = 2,
    UnknownRole = 3,
}

/// One record as received: type, request id, content (padding dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) kind: u8,
    pub(crate) request_id: u16,
    pub(crate) content: Bytes,
}

/// Why the peer's bytes are not FastCGI. Each closes the connection.
///
/// A request whose `FCGI_PARAMS` cannot become an HTTP request is not one
/// of these: it is answered `400` and the connection serves on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A record header with a version other than 1.
    #[error("unsupported FastCGI version {0} (only 1 is spoken)")]
    Version(u8),
    /// The connection ended inside a record.
    #[error("connection closed inside a record ({0} bytes of it received)")]
    Truncated(usize),
    /// A `FCGI_BEGIN_REQUEST` body of the wrong size.
    #[error("FCGI_BEGIN_REQUEST body is {0} bytes, not 8")]
    BeginRequestLength(usize),
    /// A name-value pair whose lengths run past the end of its data.
    #[error("malformed name-value pair in {0}")]
    NameValue(&'static str),
    /// A second `FCGI_BEGIN_REQUEST` for an active request id.
    #[error("FCGI_BEGIN_REQUEST for request {0}, which is already active")]
    DuplicateRequest(u16),
    /// A record the server never expects from a web server.
    #[error("unexpected record type {kind} for request {request_id}")]
    Unexpected {
        /// The record type.
        kind: u8,
        /// The request id it named.
        request_id: u16,
    },
}

/// Splits a byte stream into records.
///
/// Holds at most one record's worth of bytes (8 + 65,535 + 255) beyond what
/// the caller already gave it: the caller reads into `buf` and calls
/// [`decode`](Self::decode) until it returns `None`.
#[derive(Debug, Default)]
pub(crate) struct Decoder;

impl Decoder {
    /// The next whole record in `buf`, consuming it; `None` if `buf` holds
    /// only part of one (read more, then call again).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Record>, ProtocolError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = buf[0];
        if version != VERSION_1 {
            return Err(ProtocolError::Version(version));
        }
        let kind = buf[1];
        let request_id = u16::from_be_bytes([buf[2], buf[3]]);
        let content_len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
        let padding_len = usize::from(buf[6]);
        let total = HEADER_LEN + content_len + padding_len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let content = buf.split_to(content_len).freeze();
        buf.advance(padding_len);
        Ok(Some(Record {
            kind,
            request_id,
            content,
        }))
    }

    /// At the end of the stream: an error if a record was cut short.
    pub(crate) fn decode_eof(&mut self, buf: &BytesMut) -> Result<(), ProtocolError> {
        match buf.len() {
            0 => Ok(()),
            n => Err(ProtocolError::Truncated(n)),
        }
    }
}

/// The body of `FCGI_BEGIN_REQUEST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BeginRequest {
    pub(crate) role: u16,
    pub(crate) flags: u8,
}

impl BeginRequest {
    pub(crate) fn parse(content: &[u8]) -> Result<Self, ProtocolError> {
        if content.len() != 8 {
            return Err(ProtocolError::BeginRequestLength(content.len()));
        }
        Ok(BeginRequest {
            role: u16::from_be_bytes([content[0], content[1]]),
            flags: content[2],
        })
    }

    pub(crate) fn keep_conn(self) -> bool {
        self.flags & FLAG_KEEP_CONN != 0
    }
}

/// Decodes FastCGI name-value pairs (the content of `FCGI_PARAMS` once all
/// its records are joined, and of `FCGI_GET_VALUES`). Names and values are
/// slices of `data`, not copies.
pub(crate) fn parse_pairs(
    data: &Bytes,
    what: &'static str,
) -> Result<Vec<(Bytes, Bytes)>, ProtocolError> {
    let mut pairs = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let bad = || ProtocolError::NameValue(what);
        let (name_len, used) = read_len(&data[at..]).ok_or_else(bad)?;
        at += used;
        let (value_len, used) = read_len(&data[at..]).ok_or_else(bad)?;
        at += used;
        let name_end = at.checked_add(name_len).ok_or_else(bad)?;
        let value_end = name_end.checked_add(value_len).ok_or_else(bad)?;
        if value_end > data.len() {
            return Err(bad());
        }
        pairs.push((data.slice(at..name_end), data.slice(name_end..value_end)));
        at = value_end;
    }
    Ok(pairs)
}

/// A name-value length: one byte below 128, else four bytes with the high
/// bit set. `None` if `data` is too short.
fn read_len(data: &[u8]) -> Option<(usize, usize)> {
    let first = *data.first()?;
    if first & 0x80 == 0 {
        return Some((usize::from(first), 1));
    }
    let bytes: [u8; 4] = data.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(bytes) & 0x7fff_ffff;
    Some((usize::try_from(len).ok()?, 4))
}

fn write_len(out: &mut BytesMut, len: usize) {
    if len < 128 {
        out.put_u8(len as u8);
    } else {
        out.put_u32((len as u32) | 0x8000_0000);
    }
}

/// Encodes name-value pairs.
pub(crate) fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> BytesMut {
    let mut out = BytesMut::new();
    for (name, value) in pairs {
        write_len(&mut out, name.len());
        write_len(&mut out, value.len());
        out.put_slice(name);
        out.put_slice(value);
    }
    out
}

/// Appends one record (content at most [`MAX_CONTENT`] bytes, padded to a
/// multiple of 8 as the spec recommends).
pub(crate) fn put_record(out: &mut BytesMut, kind: u8, request_id: u16, content: &[u8]) {
    debug_assert!(content.len() <= MAX_CONTENT);
    let padding = (8 - content.len() % 8) % 8;
    out.reserve(HEADER_LEN + content.len() + padding);
    out.put_u8(VERSION_1);
    out.put_u8(kind);
    out.put_u16(request_id);
    out.put_u16(content.len() as u16);
    out.put_u8(padding as u8);
    out.put_u8(0);
    out.put_slice(content);
    out.put_bytes(0, padding);
}

/// Appends `data` as as many records of `kind` as it needs (none for empty
/// data: an empty record ends a stream, so callers write it on purpose).
pub(crate) fn put_stream(out: &mut BytesMut, kind: u8, request_id: u16, data: &[u8]) {
    for chunk in data.chunks(MAX_CONTENT) {
        put_record(out, kind, request_id, chunk);
    }
}

/// Appends `FCGI_END_REQUEST`.
pub(crate) fn put_end_request(
    out: &mut BytesMut,
    request_id: u16,
    app_status: u32,
    status: ProtocolStatus,
) {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&app_status.to_be_bytes());
    body[4] = status as u8;
    put_record(out, END_REQUEST, request_id, &body);
}

/// Appends the notice a server sends on a kept connection right after its
/// last `FCGI_END_REQUEST`, in the same write, before it closes: an empty
/// `FCGI_GET_VALUES_RESULT` (a management record, request id 0: "no
/// values"). The protocol has no record that means "closing"; what matters
/// is that bytes follow the END_REQUEST. nginx keeps an upstream FastCGI
/// connection only when its END_REQUEST is the last byte it read, and drops
/// a pooled connection that has anything to read, so it never sends a next
/// request on a connection that is about to close (its own check, in
/// `ngx_http_fastcgi_input_filter` and the keepalive module's close
/// handler). A client that reads on gets a well-formed record it may
/// ignore, then the end of the connection.
pub(crate) fn put_close_notice(out: &mut BytesMut) {
    put_record(out, GET_VALUES_RESULT, 0, b"");
}

/// Appends `FCGI_UNKNOWN_TYPE` for a management record of type `kind`.
pub(crate) fn put_unknown_type(out: &mut BytesMut, kind: u8) {
    let mut body = [0u8; 8];
    body[0] = kind;
    put_record(out, UNKNOWN_TYPE, 0, &body);
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "record type {} for request {} ({} bytes)",
            self.kind,
            self.request_id,
            self.content.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_split_anywhere() {
        let mut wire = BytesMut::new();
        put_record(&mut wire, PARAMS, 7, b"abc");
        put_record(&mut wire, STDIN, 7, b"");
        let wire = wire.freeze();
        for split in 0..wire.len() {
            let mut decoder = Decoder;
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            while let Some(r) = decoder.decode(&mut buf).unwrap() {
                got.push(r);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(r) = decoder.decode(&mut buf).unwrap() {
                got.push(r);
            }
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(&got[0].content[..], b"abc");
            assert!(decoder.decode_eof(&buf).is_ok());
        }
    }

    #[test]
    fn pairs_round_trip_with_long_lengths() {
        let long = vec![b'x'; 300];
        let wire = encode_pairs([(&b"SHORT"[..], &b"v"[..]), (&b"LONG"[..], &long[..])]);
        let pairs = parse_pairs(&wire.freeze(), "params").unwrap();
        assert_eq!(
            pairs[0],
            (Bytes::from_static(b"SHORT"), Bytes::from_static(b"v"))
        );
        assert_eq!(pairs[1].1.len(), 300);
    }

    proptest::proptest! {
        /// The decoder on arbitrary bytes, fed in arbitrary pieces: never a
        /// panic, and what it keeps buffered is less than one record.
        #[test]
        fn decoder_never_panics_and_stays_bounded(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..70_000),
            cut in 1usize..5000,
        ) {
            let mut decoder = Decoder;
            let mut buf = BytesMut::new();
            'feed: for piece in bytes.chunks(cut) {
                buf.extend_from_slice(piece);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(record)) => {
                            let _ = parse_pairs(&record.content, "fuzz");
                            let _ = BeginRequest::parse(&record.content);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                proptest::prop_assert!(buf.len() < HEADER_LEN + MAX_CONTENT + 256);
            }
        }

        #[test]
        fn pairs_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_pairs(&Bytes::from(bytes), "fuzz");
        }
    }

    #[test]
    fn lying_lengths_are_errors_not_panics() {
        for bad in [&[0x85][..], &[0xff, 0xff, 0xff, 0xff, 0x01], &[3, 3, b'a']] {
            assert!(parse_pairs(&Bytes::copy_from_slice(bad), "params").is_err());
        }
        assert_eq!(
            Decoder.decode(&mut BytesMut::from(&[2u8, 1, 0, 1, 0, 0, 0, 0][..])),
            Err(ProtocolError::Version(2))
        );
    }
}
