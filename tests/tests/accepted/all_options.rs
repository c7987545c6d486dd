use choreo::{Event, event};

#[event(
    name = "StockReserved",
    version = 2,
    subject = "inventory.{sku}.{warehouse}.reserved",
    stream = "INVENTORY_EVENTS",
    stream_subjects = "inventory.*.*.reserved",
    key = (sku, warehouse),
    upcast_from = StockReservedV1,
    crate = "::choreo",
)]
pub struct StockReserved {
    pub sku: String,
    pub warehouse: u16,
    pub quantity: u32,
}

#[event(name = "StockReserved", subject = "inventory.{sku}.{warehouse}.reserved", key = (sku, warehouse))]
pub struct StockReservedV1 {
    pub sku: String,
    pub warehouse: u16,
}

impl From<StockReservedV1> for StockReserved {
    fn from(v1: StockReservedV1) -> Self {
        Self {
            sku: v1.sku,
            warehouse: v1.warehouse,
            quantity: 1,
        }
    }
}

#[event(command_name_ok, subject = "legacy.create_user")]
pub struct CreateUser {
    pub id: u64,
}

#[event(subject = "audit.heartbeat")]
pub struct HeartbeatSent;

#[event(subject = "audit.door")]
pub enum DoorChanged {
    Opened,
    Closed { by: String },
}

pub(crate) fn main() {
    assert_eq!(StockReserved::STREAM, "INVENTORY_EVENTS");
    assert_eq!(StockReserved::SUBJECT_FILTER, "inventory.*.*.reserved");
    // A stream of this event type only; by default, the first token's.
    assert_eq!(StockReserved::STREAM_SUBJECTS, "inventory.*.*.reserved");
    assert_eq!(StockReservedV1::STREAM_SUBJECTS, "inventory.>");
    assert!(StockReserved::accepts_version(1));
    assert_eq!(CreateUser::NAME, "CreateUser");
    assert_eq!(HeartbeatSent::STREAM, "AUDIT");
    assert_eq!(DoorChanged::NAME, "DoorChanged");
}
