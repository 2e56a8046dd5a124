//! A publisher that writes AMQP 0-9-1 frames by hand, for what a Rust client refuses to build:
//! short strings (a message id, a content type, a header name) that are not valid UTF-8, as a
//! client in another language sends them and RabbitMQ accepts them. Just enough protocol for
//! one confirmed publish: handshake with PLAIN login, a channel in confirm mode, publish, wait
//! for the broker's ack, close.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A message with raw bytes where AMQP has short strings.
#[derive(Default)]
pub struct RawMessage {
    pub message_id: Option<Vec<u8>>,
    pub content_type: Option<Vec<u8>>,
    /// Headers with long-string values; the names are raw bytes.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

/// Publishes `message` to `queue` (default exchange) on the broker at `amqp_url`
/// (`amqp://user:password@host:port/...`, vhost `/`), and waits for the broker's confirm.
pub fn publish_raw(amqp_url: &str, queue: &str, message: &RawMessage) {
    let (user, password, address) = parse_url(amqp_url);
    let mut stream = TcpStream::connect(address).expect("connect to RabbitMQ");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect_method(&mut stream, (10, 10)); // connection.start
    let mut start_ok = method(10, 11);
    start_ok.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty table
    short(&mut start_ok, b"PLAIN");
    long(&mut start_ok, format!("\0{user}\0{password}").as_bytes());
    short(&mut start_ok, b"en_US");
    send(&mut stream, FRAME_METHOD, 0, &start_ok);
    let tune = expect_method(&mut stream, (10, 30));
    // The server's limits, as they are: RabbitMQ refuses a client asking for more.
    let channel_max = u16::from_be_bytes(tune[0..2].try_into().unwrap());
    let frame_max = u32::from_be_bytes(tune[2..6].try_into().unwrap());
    let mut tune_ok = method(10, 31);
    tune_ok.extend_from_slice(&channel_max.to_be_bytes());
    tune_ok.extend_from_slice(&frame_max.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    send(&mut stream, FRAME_METHOD, 0, &tune_ok);
    let mut open = method(10, 40);
    short(&mut open, b"/");
    short(&mut open, b"");
    open.push(0);
    send(&mut stream, FRAME_METHOD, 0, &open);
    expect_method(&mut stream, (10, 41));

    let mut channel_open = method(20, 10);
    short(&mut channel_open, b"");
    send(&mut stream, FRAME_METHOD, 1, &channel_open);
    expect_method(&mut stream, (20, 11));
    let mut confirm = method(85, 10);
    confirm.push(0); // nowait: no
    send(&mut stream, FRAME_METHOD, 1, &confirm);
    expect_method(&mut stream, (85, 11));

    let mut publish = method(60, 40);
    publish.extend_from_slice(&0u16.to_be_bytes());
    short(&mut publish, b"");
    short(&mut publish, queue.as_bytes());
    publish.push(0); // not mandatory, not immediate
    send(&mut stream, FRAME_METHOD, 1, &publish);
    send(&mut stream, FRAME_HEADER, 1, &content_header(message));
    send(&mut stream, FRAME_BODY, 1, &message.body);
    expect_method(&mut stream, (60, 80)); // basic.ack: the broker has it

    let mut close = method(10, 50);
    close.extend_from_slice(&200u16.to_be_bytes());
    short(&mut close, b"bye");
    close.extend_from_slice(&0u32.to_be_bytes());
    send(&mut stream, FRAME_METHOD, 0, &close);
    expect_method(&mut stream, (10, 51));
}

fn content_header(message: &RawMessage) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes()); // class: basic
    header.extend_from_slice(&0u16.to_be_bytes()); // weight
    header.extend_from_slice(&(message.body.len() as u64).to_be_bytes());
    let mut flags = 0u16;
    let mut properties = Vec::new();
    // Properties go in flag order: content-type (bit 15), headers (13), delivery-mode (12),
    // message-id (7).
    if let Some(content_type) = &message.content_type {
        flags |= 1 << 15;
        short(&mut properties, content_type);
    }
    if !message.headers.is_empty() {
        flags |= 1 << 13;
        let mut table = Vec::new();
        for (name, value) in &message.headers {
            short(&mut table, name);
            table.push(b'S');
            long(&mut table, value);
        }
        long(&mut properties, &table);
    }
    flags |= 1 << 12;
    properties.push(2); // persistent
    if let Some(id) = &message.message_id {
        flags |= 1 << 7;
        short(&mut properties, id);
    }
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(&properties);
    header
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend_from_slice(&method.to_be_bytes());
    payload
}

fn short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).expect("a short string is at most 255 bytes"));
    out.extend_from_slice(bytes);
}

fn long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn send(stream: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut frame = vec![kind];
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.push(FRAME_END);
    stream.write_all(&frame).unwrap();
}

/// Reads frames until a method frame; panics unless it is `(class, method)`. Returns its
/// arguments.
fn expect_method(stream: &mut TcpStream, expected: (u16, u16)) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        stream.read_exact(&mut head).unwrap();
        let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size + 1];
        stream.read_exact(&mut payload).unwrap();
        assert_eq!(payload[size], FRAME_END, "a frame without its end marker");
        if head[0] != FRAME_METHOD {
            continue;
        }
        let class = u16::from_be_bytes([payload[0], payload[1]]);
        let id = u16::from_be_bytes([payload[2], payload[3]]);
        assert_eq!(
            (class, id),
            expected,
            "the broker answered another method (10/50 is connection.close: {:?})",
            String::from_utf8_lossy(&payload[4..size])
        );
        payload.truncate(size);
        return payload.split_off(4);
    }
}

/// (user, password, host:port) of an `amqp://user:password@host:port/vhost` URL.
fn parse_url(url: &str) -> (String, String, String) {
    let rest = url.strip_prefix("amqp://").expect("an amqp:// URL");
    let (credentials, rest) = rest.split_once('@').expect("credentials in the URL");
    let (user, password) = credentials.split_once(':').expect("user:password");
    let address = rest.split('/').next().unwrap_or(rest);
    (user.to_owned(), password.to_owned(), address.to_owned())
}
