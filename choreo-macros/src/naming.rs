//! Events are facts: names that read as commands are refused with a hint.

/// Imperative verbs that commonly start a command name, with their past
/// participle for the suggested fact name.
const VERBS: &[(&str, &str)] = &[
    ("Accept", "Accepted"),
    ("Activate", "Activated"),
    ("Add", "Added"),
    ("Allocate", "Allocated"),
    ("Apply", "Applied"),
    ("Approve", "Approved"),
    ("Archive", "Archived"),
    ("Assign", "Assigned"),
    ("Authorize", "Authorized"),
    ("Buy", "Bought"),
    ("Calculate", "Calculated"),
    ("Cancel", "Cancelled"),
    ("Capture", "Captured"),
    ("Change", "Changed"),
    ("Charge", "Charged"),
    ("Complete", "Completed"),
    ("Confirm", "Confirmed"),
    ("Create", "Created"),
    ("Deactivate", "Deactivated"),
    ("Decline", "Declined"),
    ("Delete", "Deleted"),
    ("Deliver", "Delivered"),
    ("Deposit", "Deposited"),
    ("Disable", "Disabled"),
    ("Dispatch", "Dispatched"),
    ("Do", "Done"),
    ("Enable", "Enabled"),
    ("Execute", "Executed"),
    ("Export", "Exported"),
    ("Fetch", "Fetched"),
    ("Generate", "Generated"),
    ("Handle", "Handled"),
    ("Import", "Imported"),
    ("Invite", "Invited"),
    ("Make", "Made"),
    ("Notify", "Notified"),
    ("Pay", "Paid"),
    ("Place", "Placed"),
    ("Process", "Processed"),
    ("Publish", "Published"),
    ("Refund", "Refunded"),
    ("Register", "Registered"),
    ("Reject", "Rejected"),
    ("Release", "Released"),
    ("Remove", "Removed"),
    ("Reserve", "Reserved"),
    ("Restore", "Restored"),
    ("Save", "Saved"),
    ("Schedule", "Scheduled"),
    ("Sell", "Sold"),
    ("Send", "Sent"),
    ("Ship", "Shipped"),
    ("Start", "Started"),
    ("Stop", "Stopped"),
    ("Submit", "Submitted"),
    ("Transfer", "Transferred"),
    ("Update", "Updated"),
    ("Upload", "Uploaded"),
    ("Validate", "Validated"),
    ("Verify", "Verified"),
    ("Withdraw", "Withdrawn"),
];

/// Splits `CamelCase` into words (`HTTPRequest` → `HTTP`, `Request`).
fn words(name: &str) -> Vec<&str> {
    let bytes = name.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..bytes.len() {
        let (prev, cur) = (bytes[i - 1], bytes[i]);
        let next_lower = bytes.get(i + 1).is_some_and(u8::is_ascii_lowercase);
        let boundary = (cur.is_ascii_uppercase()
            && (prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower)))
            || cur == b'_';
        if boundary {
            out.push(&name[start..i]);
            start = if cur == b'_' { i + 1 } else { i };
        }
    }
    out.push(&name[start..]);
    out.retain(|w| !w.is_empty());
    out
}

fn is_past_tense(word: &str) -> bool {
    word.ends_with("ed") || VERBS.iter().any(|(_, past)| *past == word)
}

/// If `name` reads as a command, the fact name to suggest instead.
pub(crate) fn command_suggestion(name: &str) -> Option<String> {
    let words = words(name);
    let (first, rest) = words.split_first()?;
    let (_, past) = VERBS.iter().find(|(verb, _)| verb == first)?;
    if rest.last().is_some_and(|w| is_past_tense(w)) {
        return None;
    }
    Some(format!("{}{past}", rest.concat()))
}

#[cfg(test)]
mod tests {
    use super::{command_suggestion, words};

    #[test]
    fn commands_get_a_fact_suggestion() {
        assert_eq!(
            command_suggestion("CreateOrder").as_deref(),
            Some("OrderCreated")
        );
        assert_eq!(
            command_suggestion("ProcessPayment").as_deref(),
            Some("PaymentProcessed")
        );
        assert_eq!(
            command_suggestion("SendEmail").as_deref(),
            Some("EmailSent")
        );
        assert_eq!(
            command_suggestion("ShipOrderNow").as_deref(),
            Some("OrderNowShipped")
        );
        assert_eq!(command_suggestion("Cancel").as_deref(), Some("Cancelled"));
    }

    #[test]
    fn facts_pass() {
        for name in [
            "OrderCreated",
            "PaymentCaptured",
            "CheckoutStarted",
            "ShipmentDelivered",
            "CreateOrderRequested",
            "SendFailed",
            "Order",
        ] {
            assert_eq!(command_suggestion(name), None, "{name}");
        }
    }

    #[test]
    fn splits_camel_case() {
        assert_eq!(words("HTTPRequestSent"), ["HTTP", "Request", "Sent"]);
        assert_eq!(words("Order2Placed"), ["Order2", "Placed"]);
    }
}
