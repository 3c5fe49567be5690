//! A FastCGI client written from the spec, for tests that talk records.

use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// A FastCGI client, from the spec (not the crate's own encoder).
// ---------------------------------------------------------------------------

pub fn record(kind: u8, id: u16, content: &[u8]) -> Vec<u8> {
    let mut out = vec![
        1,
        kind,
        (id >> 8) as u8,
        id as u8,
        (content.len() >> 8) as u8,
        content.len() as u8,
        0,
        0,
    ];
    out.extend_from_slice(content);
    out
}

pub fn begin(id: u16, role: u16, keep: bool) -> Vec<u8> {
    record(
        1,
        id,
        &[(role >> 8) as u8, role as u8, u8::from(keep), 0, 0, 0, 0, 0],
    )
}

pub fn pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        for len in [name.len(), value.len()] {
            if len < 128 {
                out.push(len as u8);
            } else {
                out.extend_from_slice(&((len as u32) | 0x8000_0000).to_be_bytes());
            }
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A whole request: begin, params, stdin.
pub fn request(id: u16, keep: bool, uri: &str, body: &[u8]) -> Vec<u8> {
    let mut out = begin(id, 1, keep);
    let params = pairs(&[
        ("REQUEST_METHOD", "POST"),
        ("REQUEST_URI", uri),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("HTTP_X_TEST", "yes"),
        ("CONTENT_TYPE", "text/plain"),
        ("CONTENT_LENGTH", &body.len().to_string()),
        ("REMOTE_ADDR", "192.0.2.7"),
        ("REMOTE_PORT", "4321"),
    ]);
    out.extend(record(4, id, &params));
    out.extend(record(4, id, b""));
    for chunk in body.chunks(60_000) {
        out.extend(record(5, id, chunk));
    }
    out.extend(record(5, id, b""));
    out
}

/// The start of a POST to `uri` announcing a 100,000-byte body: begin
/// (keep-conn), params, and the first 50,000 bytes of stdin. The rest
/// would be [`rest_of_partial`].
pub fn partial_post(id: u16, uri: &str) -> Vec<u8> {
    let mut out = begin(id, 1, true);
    out.extend(record(
        4,
        id,
        &pairs(&[
            ("REQUEST_METHOD", "POST"),
            ("REQUEST_URI", uri),
            ("CONTENT_LENGTH", "100000"),
        ]),
    ));
    out.extend(record(4, id, b""));
    out.extend(record(5, id, &[0u8; 50_000]));
    out
}

/// The other 50,000 bytes of a [`partial_post`], and the end of its stdin.
pub fn rest_of_partial(id: u16) -> Vec<u8> {
    let mut out = record(5, id, &[0u8; 50_000]);
    out.extend(record(5, id, b""));
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rec {
    pub kind: u8,
    pub id: u16,
    pub content: Vec<u8>,
}

/// The first whole record in `buf`, removed from it; `None` while `buf`
/// holds only part of one.
pub fn take_record(buf: &mut Vec<u8>) -> Option<Rec> {
    if buf.len() < 8 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    let total = 8 + len + usize::from(buf[6]);
    if buf.len() < total {
        return None;
    }
    assert_eq!(buf[0], 1, "version");
    let rec = Rec {
        kind: buf[1],
        id: u16::from_be_bytes([buf[2], buf[3]]),
        content: buf[8..8 + len].to_vec(),
    };
    buf.drain(..total);
    Some(rec)
}

/// Reads records until `FCGI_END_REQUEST` for each of `ids` (or the
/// connection closes, or 5 s pass).
pub async fn read_until_end(stream: &mut TcpStream, ids: &[u16]) -> Vec<Rec> {
    let mut buf = Vec::new();
    let mut recs = Vec::new();
    let mut ended = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        while let Some(rec) = take_record(&mut buf) {
            if rec.kind == 3 {
                ended.push(rec.id);
            }
            recs.push(rec);
        }
        if ids.iter().all(|id| ended.contains(id)) {
            return recs;
        }
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return recs,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The stdout of request `id`, and its END_REQUEST protocol status.
pub fn response_of(recs: &[Rec], id: u16) -> (String, Option<u8>) {
    let stdout: Vec<u8> = recs
        .iter()
        .filter(|r| r.id == id && r.kind == 6)
        .flat_map(|r| r.content.clone())
        .collect();
    let end = recs
        .iter()
        .find(|r| r.id == id && r.kind == 3)
        .map(|r| r.content[4]);
    (String::from_utf8_lossy(&stdout).into_owned(), end)
}
