#![allow(unused)]

use choreo::{event, event_handler};

#[event(subject = "ledger.{account}.stepped", key = (account, n))]
pub struct Stepped {
    pub account: String,
    pub n: u32,
    pub note: String,
}

// Ordered by what? The key names one fact.
#[event_handler(ordered)]
async fn a(s: Stepped) {}

// `note` is not in the subject: no partition can be chosen from it.
#[event_handler(ordered_by = note)]
async fn b(s: Stepped) {}

// A partition runs one event at a time: `concurrency` does not apply.
#[event_handler(ordered_by = account, concurrency = 8)]
async fn c(s: Stepped) {}

// `partitions` needs an ordered handler.
#[event_handler(partitions = 8)]
async fn d(s: Stepped) {}

fn main() {}
