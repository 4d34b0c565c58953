//! The metrics endpoint: off by default; with `pg_tenancy.metrics_port` set, a background worker
//! connected to `pg_tenancy.metrics_database` answers `GET /metrics` with `tenancy.metrics()`
//! (Prometheus text, version 0.0.4), so Prometheus scrapes the database without an exporter.
//! One request at a time: the request read whole within 2 seconds (at most 8 KiB), the answer
//! written within 5; anything but `/metrics` is 404 (another method 405); a database without
//! pg_tenancy answers 503.
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Register the worker (from _PG_init, while the postmaster loads the library).
pub fn init() {
    // SAFETY: reads a flag the postmaster sets while it loads shared_preload_libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } || crate::gucs::metrics_port() == 0 {
        return;
    }
    BackgroundWorkerBuilder::new("pg_tenancy metrics")
        .set_type("pg_tenancy metrics")
        .set_library("pg_tenancy")
        .set_function("pg_tenancy_metrics_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

/// The request line of a request (method and path), read within the timeout.
fn request_line(stream: &mut TcpStream) -> Option<(String, String)> {
    // the whole request within 2 seconds (a client sending a byte at a time gets no longer)
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let left = deadline.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero())?;
        stream.set_read_timeout(Some(left)).ok()?;
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut parts = text.lines().next()?.split_whitespace();
    Some((parts.next()?.to_string(), parts.next()?.to_string()))
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    // (a client that does not read the answer is dropped after 5 seconds)
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Some((method, path)) = request_line(&mut stream) else { return };
    let path = path.split('?').next().unwrap_or("");
    if path != "/metrics" {
        respond(&mut stream, "404 Not Found", "text/plain", "not found: the metrics are at /metrics\n");
        return;
    }
    if method != "GET" && method != "HEAD" {
        respond(&mut stream, "405 Method Not Allowed", "text/plain", "GET /metrics\n");
        return;
    }
    let body = BackgroundWorker::transaction(|| {
        let installed = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_tenancy')")
            .ok()
            .flatten()
            .unwrap_or(false);
        if installed {
            Spi::get_one::<String>("SELECT tenancy.metrics()").ok().flatten()
        } else {
            None
        }
    });
    match body {
        Some(text) => {
            let text = if method == "HEAD" { String::new() } else { text };
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &text)
        }
        None => respond(&mut stream, "503 Service Unavailable", "text/plain", "pg_tenancy is not installed in pg_tenancy.metrics_database\n"),
    }
}

/// Main function of the metrics worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_metrics_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&crate::gucs::metrics_database()), None);
    let addr = format!("{}:{}", crate::gucs::metrics_listen_address(), crate::gucs::metrics_port());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            pgrx::log!("pg_tenancy metrics: cannot listen on {addr}: {e}");
            return;
        }
    };
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    pgrx::log!("pg_tenancy metrics: serving http://{addr}/metrics");
    loop {
        match listener.accept() {
            Ok((stream, _)) => serve(stream),
            // none waiting (or a failed accept): look again shortly; leave on SIGTERM or when
            // the postmaster is gone (wait_latch says so, and consumes the SIGTERM flag)
            Err(_) => {
                if !BackgroundWorker::wait_latch(Some(Duration::from_millis(100))) {
                    break;
                }
            }
        }
        if BackgroundWorker::sigterm_received() {
            break;
        }
    }
}
