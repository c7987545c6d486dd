//! What a handler may fail with, as its return type or through `?` into
//! `HandlerError`: any `std::error::Error + Send + Sync`, a boxed error,
//! `anyhow::Error`, and a `String` message.

use choreo::{HandlerError, event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

fn parse(id: &str) -> Result<u32, std::num::ParseIntError> {
    id.parse()
}

#[event_handler]
async fn io_error(_order: OrderPlaced) -> Result<(), std::io::Error> {
    Ok(())
}

#[event_handler]
async fn boxed_error(order: OrderPlaced) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    parse(&order.order_id)?;
    Ok(())
}

#[event_handler]
async fn with_anyhow(order: OrderPlaced) -> anyhow::Result<()> {
    parse(&order.order_id)?;
    Ok(())
}

#[event_handler]
async fn message(_order: OrderPlaced) -> Result<(), String> {
    Err("declined".to_owned())
}

#[event_handler]
async fn question_marks(order: OrderPlaced) -> Result<(), HandlerError> {
    parse(&order.order_id)?;
    let boxed: Result<(), Box<dyn std::error::Error + Send + Sync>> = Ok(());
    boxed?;
    let any: anyhow::Result<()> = Ok(());
    any?;
    let text: Result<(), String> = Ok(());
    text?;
    Ok(())
}

pub(crate) fn main() {
    let _ = choreo::Service::new("s")
        .handler(io_error)
        .handler(boxed_error)
        .handler(with_anyhow)
        .handler(message)
        .handler(question_marks);
}
