//! Serves the example on 127.0.0.1:3000 with two sessions:
//!
//! ```text
//! cargo run -p keel-example-axum-payments
//! curl -si localhost:3000/payments -H 'Cookie: session=s-alice' -H 'Idempotency-Key: p-1' -d '{"amount":5}'
//! curl -si localhost:3000/payments -H 'Cookie: session=s-alice' -H 'Idempotency-Key: p-1' -d '{"amount":5}'  # replay
//! curl -si localhost:3000/payments -H 'Cookie: session=s-bob' -H 'Idempotency-Key: p-1' -d '{"amount":5}'    # bob's own payment
//! curl -si localhost:3000/payments -H 'Idempotency-Key: p-1' -d '{"amount":5}'                               # 400 tenant missing
//! ```

use keel_example_axum_payments::outbound::{Outbound, Provider};
use keel_example_axum_payments::{Sessions, app};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let sessions = Sessions::new([("s-alice", "alice"), ("s-bob", "bob")]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(sessions, Outbound::new(Provider::new()))).await
}
