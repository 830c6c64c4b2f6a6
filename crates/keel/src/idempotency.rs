//! `keel idempotency`: shows what the store holds for one client key, or
//! releases a key locked as "outcome unknown" once the operator has
//! reconciled it.

/// Looks `query` up on the gateway at `admin` (removing it with `release`)
/// and prints the answer as JSON.
pub async fn run(
    admin: String,
    query: keel_admin::KeyQuery,
    release: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match keel_admin::idempotency_key(&admin, &query, release).await {
        Ok(answer) => {
            // Through `Value`, keys sorted as the admin API writes them.
            println!("{:#}", serde_json::to_value(&answer)?);
            Ok(())
        }
        Err(keel_admin::StatusError::Refused { status, error }) => {
            let why = error.as_deref().unwrap_or("unexpected answer");
            Err(format!("{status}: {why}").into())
        }
        Err(error) => Err(error.into()),
    }
}
