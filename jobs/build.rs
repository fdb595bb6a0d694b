// `sqlx::migrate!` embeds migrations/ at compile time, and cargo does not know it reads them:
// without this, a new or edited migration is missing from the binaries until some Rust file of
// this crate changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
