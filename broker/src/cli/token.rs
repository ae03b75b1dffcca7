//! `ketenbus token`: bearer tokens for `[[senders]]` and `[[operators]]`.

use crate::http::auth::{new_token, token_hash};

/// Make a random token and print it with the `token_sha256` line for the config.
pub fn new() {
    let (token, hash) = new_token();
    println!("token = {token}");
    println!("token_sha256 = \"{hash}\"");
}

/// Print the `token_sha256` of a token read from standard input.
///
/// # Errors
/// Standard input cannot be read.
pub fn hash() -> std::io::Result<()> {
    let mut token = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)?;
    println!("token_sha256 = \"{}\"", token_hash(token.trim()));
    Ok(())
}
