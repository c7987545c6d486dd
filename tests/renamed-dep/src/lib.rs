//! This crate depends on `choreo` renamed to `events`; no `::choreo` path
//! exists here, so these items compile only if the expansion honours
//! `crate = "events"` everywhere, serde derives included.

use events::event;

/// A keyed event declared through the renamed crate.
#[event(crate = "events", subject = "ledger.{account}.credited", key = account)]
#[derive(Debug, PartialEq)]
pub struct AccountCredited {
    /// The account.
    pub account: String,
    /// The amount.
    pub cents: u64,
}

/// The older shape, to exercise `upcast_from` through the renamed crate.
#[event(crate = "events", name = "AccountDebited", subject = "ledger.debited")]
pub struct AccountDebitedV1 {
    /// The amount.
    pub cents: u32,
}

/// The newer shape.
#[event(crate = "events", version = 2, subject = "ledger.debited", upcast_from = AccountDebitedV1)]
pub struct AccountDebited {
    /// The amount.
    pub cents: u64,
}

impl From<AccountDebitedV1> for AccountDebited {
    fn from(v1: AccountDebitedV1) -> Self {
        Self {
            cents: v1.cents.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use events::Event;

    use super::{AccountCredited, AccountDebited};

    #[test]
    fn the_renamed_crate_path_is_used() {
        let e = AccountCredited {
            account: "acc-1".into(),
            cents: 5,
        };
        assert_eq!(e.subject().unwrap(), "ledger.acc-1.credited");
        let bytes = events::codec::encode(&e).unwrap();
        assert_eq!(
            events::codec::decode::<AccountCredited>(1, &bytes).unwrap(),
            e
        );
        assert!(AccountDebited::accepts_version(1));
    }
}
