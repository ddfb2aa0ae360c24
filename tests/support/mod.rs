//! Helpers of the tests that run the real binary.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr};
use std::time::Duration;

use serde_json::Value;

/// A child process killed when the test ends, passing or not.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a server's log until it names the address it serves on, and keeps draining the log
/// afterwards so the server never blocks on a full pipe.
pub fn serving_address(stderr: ChildStderr) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("address=") {
                let addr = line[i + 8..].split_whitespace().next().unwrap_or_default();
                let _ = tx.send(addr.to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the server logs its address")
}

/// GET `url`; the body and its JSON.
pub fn get_json(url: &str) -> (String, Value) {
    let body = ureq::get(url)
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let json = serde_json::from_str(&body).unwrap();
    (body, json)
}

/// The sum of the integer metric `name` over an answer's rows.
pub fn sum_of(answer: &Value, name: &str) -> u64 {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"][name].as_u64().unwrap())
        .sum()
}

/// `YYYY-MM-DD`, `days` from today (UTC).
pub fn day(days: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::days(days))
        .format("%Y-%m-%d")
        .to_string()
}
