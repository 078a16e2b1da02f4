//! A tiny Lambda function for the emulator's own tests. It plays runtime (and, optionally, an
//! internal extension) over plain blocking HTTP/1.1 on `std::net::TcpStream`, without
//! lambda_runtime, so the emulator is tested against nothing but the wire protocol.
//!
//! Environment:
//! - `EMU_PROBE_TICK_MS=n`: a background thread prints `tick <k>` every `n` ms (shows whether
//!   the process runs or is frozen);
//! - `EMU_PROBE_INIT_ERROR=1`: posts `/runtime/init/error` and exits;
//! - `EMU_PROBE_EXTENSION=name`: registers an internal extension (INVOKE) before the runtime's
//!   first `/next` and runs its `event/next` loop on a thread.
//!
//! Payloads: `hang` is never answered; `crash` exits with status 3; `error` posts an invocation
//! error; `mark:<text>` posts `<text>` to `/__testkit/mark`, then answers `ok`; `env:<NAME>`
//! answers the variable's value; `sleep:<ms>` sleeps that long, then echoes; anything else is
//! echoed.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`), read to EOF.
fn request(
    api: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Reply> {
    let mut stream = TcpStream::connect(api)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> io::Result<Reply> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

fn main() {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        eprintln!("emu_probe: AWS_LAMBDA_RUNTIME_API is not set");
        std::process::exit(2);
    };
    println!("probe started pid={}", std::process::id());

    if let Some(ms) = std::env::var("EMU_PROBE_TICK_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::spawn(move || {
            for k in 0u64.. {
                println!("tick {k}");
                std::thread::sleep(Duration::from_millis(ms));
            }
        });
    }

    if std::env::var("EMU_PROBE_INIT_ERROR").is_ok_and(|v| v == "1") {
        let _ = request(
            &api,
            "POST",
            "/2018-06-01/runtime/init/error",
            &[(
                "Lambda-Runtime-Function-Error-Type",
                "Runtime.ProbeInitError",
            )],
            br#"{"errorMessage":"probe init failed","errorType":"Runtime.ProbeInitError"}"#,
        );
        std::process::exit(1);
    }

    if let Ok(name) = std::env::var("EMU_PROBE_EXTENSION") {
        // Registration must happen before the runtime's first /next.
        let registered = request(
            &api,
            "POST",
            "/2020-01-01/extension/register",
            &[("Lambda-Extension-Name", &name)],
            br#"{"events":["INVOKE"]}"#,
        );
        match registered {
            Ok(reply) if reply.status == 200 => {
                let id = reply
                    .header("Lambda-Extension-Identifier")
                    .unwrap_or_default()
                    .to_owned();
                println!("extension registered {name}");
                let api = api.clone();
                std::thread::spawn(move || extension_loop(&api, &id));
            }
            Ok(reply) => println!("extension registration refused {}", reply.status),
            Err(e) => println!("extension registration failed {e}"),
        }
    }

    runtime_loop(&api);
}

fn extension_loop(api: &str, id: &str) {
    loop {
        match request(
            api,
            "GET",
            "/2020-01-01/extension/event/next",
            &[("Lambda-Extension-Identifier", id)],
            b"",
        ) {
            Ok(reply) => {
                let body = String::from_utf8_lossy(&reply.body).into_owned();
                println!("extension event {} {body}", reply.status);
            }
            Err(e) => {
                println!("extension event/next failed {e}");
                return;
            }
        }
    }
}

fn runtime_loop(api: &str) {
    loop {
        let next = match request(api, "GET", "/2018-06-01/runtime/invocation/next", &[], b"") {
            Ok(reply) if reply.status == 200 => reply,
            Ok(reply) => {
                println!("runtime next refused {}", reply.status);
                std::process::exit(4);
            }
            Err(e) => {
                println!("runtime next failed {e}");
                std::process::exit(4);
            }
        };
        let id = next
            .header("Lambda-Runtime-Aws-Request-Id")
            .unwrap_or_default()
            .to_owned();
        let payload = String::from_utf8_lossy(&next.body).into_owned();
        println!("invocation {id} {payload}");
        let answer = if payload == "hang" {
            loop {
                std::thread::park();
            }
        } else if payload == "crash" {
            std::process::exit(3);
        } else if payload == "error" {
            let _ = request(
                api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/error"),
                &[("Lambda-Runtime-Function-Error-Type", "Probe.Error")],
                br#"{"errorMessage":"probe failed","errorType":"Probe.Error"}"#,
            );
            continue;
        } else if let Some(text) = payload.strip_prefix("mark:") {
            let _ = request(api, "POST", "/__testkit/mark", &[], text.as_bytes());
            "ok".to_owned()
        } else if let Some(name) = payload.strip_prefix("env:") {
            std::env::var(name).unwrap_or_default()
        } else if let Some(ms) = payload.strip_prefix("sleep:") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            payload
        } else {
            payload
        };
        let _ = request(
            api,
            "POST",
            &format!("/2018-06-01/runtime/invocation/{id}/response"),
            &[],
            answer.as_bytes(),
        );
    }
}
