//! `keel status`: prints a running gateway's status from its admin API.

/// Fetches `/status` from `admin` and prints it as text.
pub async fn run(admin: String) -> Result<(), Box<dyn std::error::Error>> {
    let status = keel_admin::fetch_status(&admin).await?;
    print!("{}", keel_admin::render_status(&status));
    Ok(())
}
