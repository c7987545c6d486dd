//! `choreo events` lists an aggregate's events as stored, up to a sequence
//! or a time, payloads as JSON, against a real server.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::convert::Infallible;

use choreo::{Aggregate, AggregateEvent, Aggregates, Publisher, event};
use choreo_testkit::NatsServer;
use common::choreo;

#[event(subject = "seats.{course}.taken")]
pub struct SeatTaken {
    pub course: String,
    pub student: String,
}

#[derive(AggregateEvent)]
pub enum CourseEvent {
    Taken(SeatTaken),
}

#[derive(Default, Clone)]
pub struct Course {
    taken: u32,
}

impl Aggregate for Course {
    const NAME: &'static str = "Course";
    type Event = CourseEvent;
    fn filter(course: &str) -> String {
        format!("seats.{course}.*")
    }
    fn apply(&mut self, _: &CourseEvent) {
        self.taken += 1;
    }
}

#[tokio::test]
async fn events_lists_an_aggregates_history_up_to_a_point() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let courses = Aggregates::new(Publisher::new(client, "school").unwrap());
    for (course, student) in [("c1", "ann"), ("c2", "bob"), ("c1", "cat")] {
        courses
            .decide::<Course, _, Infallible>(course, |_| {
                Ok(vec![CourseEvent::Taken(SeatTaken {
                    course: course.into(),
                    student: student.into(),
                })])
            })
            .await
            .unwrap();
    }
    let (code, out, err) = choreo(&server, &["events", "SEATS", "seats.c1.*", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let students: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["payload"]["student"].as_str().unwrap())
        .collect();
    assert_eq!(students, ["ann", "cat"], "c1's events only, in order");
    assert_eq!(v[1]["sequence"], 3);
    assert_eq!(v[1]["event_type"], "SeatTaken");

    // Up to a sequence: c1 as it was after the first seat.
    let (_, out, _) = choreo(&server, &["events", "SEATS", "seats.c1.*", "--until", "2"]);
    assert!(
        out.starts_with("#1 ") && out.contains("SeatTaken v1"),
        "{out}"
    );
    assert!(
        out.contains(r#""student":"ann""#) && !out.contains("cat"),
        "{out}"
    );

    let (code, out, _) = choreo(&server, &["events", "SEATS", "seats.c9.*"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "no events on seats.c9.* in SEATS\n")
    );
    let (code, _, err) = choreo(&server, &["events", "NOPE", "nope.>"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("NOPE"), "{err}");
}
