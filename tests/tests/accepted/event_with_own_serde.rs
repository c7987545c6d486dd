//! `#[event]` on a type that derives serde itself, or carries serde
//! attributes: both keep working, and the attributes take effect.

use choreo::{Event, event};
use serde::{Deserialize, Serialize};

#[event(subject = "users.{id}.renamed", key = id)]
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
#[serde(rename_all = "camelCase")]
pub struct UserRenamed {
    pub id: String,
    pub new_name: String,
}

#[event(subject = "users.{id}.deleted")]
#[derive(Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserDeleted {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Only one of the two derived by hand: choreo adds the other.
#[event(subject = "users.{id}.archived")]
#[derive(Serialize, Debug, PartialEq)]
pub struct UserArchived {
    pub id: String,
}

pub(crate) fn main() {
    let renamed = UserRenamed {
        id: "u-1".into(),
        new_name: "Ada".into(),
    };
    let json = serde_json::to_value(&renamed).unwrap();
    assert_eq!(json["newName"], "Ada", "rename_all applies: {json}");
    let bytes = choreo::codec::encode(&renamed).unwrap();
    let back: UserRenamed = choreo::codec::decode(1, &bytes).unwrap();
    assert_eq!(back, renamed);

    let deleted = UserDeleted {
        id: "u-2".into(),
        reason: String::new(),
    };
    assert_eq!(
        serde_json::to_value(&deleted).unwrap(),
        serde_json::json!({ "id": "u-2" })
    );
    let bytes = choreo::codec::encode(&deleted).unwrap();
    let back: UserDeleted = choreo::codec::decode(1, &bytes).unwrap();
    assert_eq!(back, deleted);

    let archived = UserArchived { id: "u-3".into() };
    let bytes = choreo::codec::encode(&archived).unwrap();
    assert_eq!(
        choreo::codec::decode::<UserArchived>(1, &bytes).unwrap(),
        archived
    );
    assert_eq!(UserArchived::NAME, "UserArchived");
}
