//! The HTTP/1.1 client side of the `keel` gateway.
//!
//! A [`Connection`] is one upstream TCP connection, driven from the task of
//! the request it carries: [`Connection::send`] writes the request head
//! and body, watches for an answer that comes before the body is done,
//! parses the response head with `httparse` and returns a [`ResponseBody`]
//! that reads the rest from the same connection. When that body ends, the
//! connection goes back to its [`Pool`]. There is no connection task and
//! no channel between the request and its connection, which is where a
//! general-purpose client spends a third of a proxied request.
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//!
//! use http_body_util::{BodyExt, Empty};
//! use keel_h1::{Connection, Pool};
//!
//! /// A pool of one, for the example.
//! #[derive(Debug, Default)]
//! struct One(Mutex<Option<Box<Connection>>>);
//!
//! impl Pool for One {
//!     fn checkin(&self, connection: Box<Connection>) {
//!         *self.0.lock().expect("pool") = Some(connection);
//!     }
//! }
//!
//! # async fn example() -> Result<(), keel_h1::BoxError> {
//! let pool: Arc<dyn Pool> = Arc::new(One::default());
//! let stream = tokio::net::TcpStream::connect("127.0.0.1:8080").await?;
//! let connection = Connection::new(stream, Box::new(()));
//! let (head, body) = http::Request::get("/")
//!     .header(http::header::HOST, "127.0.0.1:8080")
//!     .body(Empty::<bytes::Bytes>::new())?
//!     .into_parts();
//! let extra = keel_h1::ExtraLines::new();
//! let response = connection
//!     .send(&head, &extra, body, &pool)
//!     .await
//!     .map_err(|f| f.error)?;
//! let body = response.into_body().collect().await?.to_bytes();
//! println!("{} bytes; the connection is back in the pool", body.len());
//! # Ok(())
//! # }
//! ```

mod body;
mod conn;
mod error;
mod request;
mod response;

pub use body::ResponseBody;
pub use conn::{Connection, Failure, OnUpgrade, Pool, Unsent, Upgraded};
pub use error::{BoxError, Error};
pub use request::ExtraLines;
pub use response::{MAX_HEAD_SIZE, MAX_HEADERS};
