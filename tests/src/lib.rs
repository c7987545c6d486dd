//! Support for choreo's cross-crate tests: the decode-path fuzz target,
//! shared by the bounded fuzz test (`tests/fuzz_decode.rs`, run in CI) and the
//! cargo-fuzz target (`fuzz/`, for long runs by hand).

pub mod fuzz {
    //! The fuzz target: arbitrary bytes become a message (headers and payload)
    //! that choreo decodes as several event types. It must never panic.

    use std::str::FromStr;

    use choreo::async_nats::{HeaderMap, HeaderName, HeaderValue};
    use choreo::{Envelope, Event, Metadata, event};

    /// A struct with assorted field types.
    #[event(subject = "fuzz.{id}.happened", key = (id, n))]
    #[derive(Debug, Clone, PartialEq)]
    pub struct Happened {
        /// A string field used in the subject and key.
        pub id: String,
        /// A number in the key.
        pub n: u64,
        /// Optional data.
        pub tags: Option<Vec<String>>,
        /// A float.
        pub ratio: f64,
    }

    /// Version 1 of a versioned event.
    #[event(name = "PriceSet", subject = "prices.{sku}.set", key = sku)]
    #[derive(Debug, Clone, PartialEq)]
    pub struct PriceSetV1 {
        /// The product.
        pub sku: String,
        /// The price.
        pub cents: u32,
    }

    /// Version 2, read from version 1 through `upcast_from`.
    #[event(name = "PriceSet", version = 2, subject = "prices.{sku}.set", key = sku, upcast_from = PriceSetV1)]
    #[derive(Debug, Clone, PartialEq)]
    pub struct PriceSet {
        /// The product.
        pub sku: String,
        /// The price.
        pub cents: u64,
        /// The currency.
        pub currency: String,
    }

    impl From<PriceSetV1> for PriceSet {
        fn from(v1: PriceSetV1) -> Self {
            Self {
                sku: v1.sku,
                cents: v1.cents.into(),
                currency: "EUR".into(),
            }
        }
    }

    /// An enum event.
    #[event(subject = "doors.changed")]
    #[derive(Debug, Clone, PartialEq)]
    pub enum DoorChanged {
        /// Opened.
        Opened,
        /// Closed by someone.
        Closed {
            /// Who.
            by: String,
        },
    }

    /// Splits `data` into headers and payload: lines `name: value` up to an
    /// empty line, then the payload. Names and values that NATS could not
    /// carry (a CR or LF in a value, a bad name) are skipped, as the server's
    /// parser would never produce them.
    pub fn split(data: &[u8]) -> (HeaderMap, &[u8]) {
        let (head, payload) = match data.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&data[..i], &data[i + 2..]),
            None => (&data[..0], data),
        };
        let mut headers = HeaderMap::new();
        for line in String::from_utf8_lossy(head).lines() {
            if let Some((name, value)) = line.split_once(": ")
                && let (Ok(n), Ok(v)) = (HeaderName::from_str(name), HeaderValue::from_str(value))
            {
                headers.append(n, v);
            }
        }
        (headers, payload)
    }

    /// Joins headers and payload into the input format of [`split`].
    pub fn join(headers: &HeaderMap, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut names: Vec<_> = headers.iter().collect();
        names.sort_by(|a, b| AsRef::<str>::as_ref(a.0).cmp(AsRef::<str>::as_ref(b.0)));
        for (name, values) in names {
            for v in values {
                out.extend_from_slice(
                    format!("{}: {}\n", AsRef::<str>::as_ref(name), v.as_str()).as_bytes(),
                );
            }
        }
        out.extend_from_slice(b"\n");
        out.extend_from_slice(payload);
        out
    }

    fn decode_as<E: Event>(headers: &HeaderMap, payload: &[u8]) {
        if let Ok(env) = Envelope::<E>::decode("fuzz.subject", headers, payload) {
            // A decoded event must re-encode, and its subject must render or
            // fail cleanly (arbitrary strings reach the subject here).
            let _ = env.event().subject();
            let _ = env.to_message();
        }
    }

    /// The fuzz target. Never panics.
    pub fn decode_any(data: &[u8]) {
        let (headers, payload) = split(data);
        let _ = Metadata::from_headers(&headers);
        decode_as::<Happened>(&headers, payload);
        decode_as::<PriceSet>(&headers, payload);
        decode_as::<PriceSetV1>(&headers, payload);
        decode_as::<DoorChanged>(&headers, payload);
        for version in [0, 1, 2, 3, u32::MAX] {
            let _ = choreo::codec::decode::<PriceSet>(version, payload);
        }
    }

    /// Valid messages of every event type, to start mutating from.
    pub fn seeds() -> Vec<Vec<u8>> {
        fn message<E: Event + Clone>(e: &E) -> Vec<u8> {
            let meta = Metadata::root(e, "fuzz").expect("valid source");
            let env = Envelope::new(e.clone(), meta).expect("valid subject");
            let (h, p) = env.to_message().expect("encodes");
            join(&h, &p)
        }
        vec![
            message(&Happened {
                id: "a-1".into(),
                n: 7,
                tags: Some(vec!["x".into()]),
                ratio: 0.5,
            }),
            message(&PriceSetV1 {
                sku: "s".into(),
                cents: 10,
            }),
            message(&PriceSet {
                sku: "s".into(),
                cents: 10,
                currency: "USD".into(),
            }),
            message(&DoorChanged::Closed { by: "bo".into() }),
            message(&DoorChanged::Opened),
        ]
    }
}
