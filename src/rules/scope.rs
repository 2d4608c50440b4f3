//! Scope and client-id rules (RFC 6749 `scope-token`; Cognito app client ids).

/// Longest scope string accepted.
pub const MAX_SCOPE_LEN: usize = 256;

/// Longest client id accepted.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Why a scope string is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Empty string.
    #[error("empty scope")]
    Empty,
    /// Too long.
    #[error("scope longer than {MAX_SCOPE_LEN} bytes")]
    TooLong,
    /// Whitespace, control, quote, backslash or non-ASCII byte.
    #[error("scope contains a character outside printable ASCII (or a space, quote or backslash)")]
    BadCharacter,
}

/// RFC 6749 `scope-token`: `%x21 / %x23-5B / %x5D-7E`, bounded length.
pub fn validate_scope(scope: &str) -> Result<(), ScopeError> {
    if scope.is_empty() {
        return Err(ScopeError::Empty);
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(ScopeError::TooLong);
    }
    if !scope
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    {
        return Err(ScopeError::BadCharacter);
    }
    Ok(())
}

/// Cognito app client ids are alphanumeric; accept a slightly wider, still safe
/// set: 1-128 characters of `[A-Za-z0-9_+-]`.
pub fn is_valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_tokens_follow_rfc_6749() {
        assert_eq!(validate_scope("orders/read"), Ok(()));
        assert_eq!(validate_scope(""), Err(ScopeError::Empty));
        assert_eq!(validate_scope("a b"), Err(ScopeError::BadCharacter));
        assert_eq!(validate_scope("a\"b"), Err(ScopeError::BadCharacter));
        assert_eq!(validate_scope("a\\b"), Err(ScopeError::BadCharacter));
        assert_eq!(validate_scope("é"), Err(ScopeError::BadCharacter));
        assert_eq!(validate_scope(&"a".repeat(257)), Err(ScopeError::TooLong));
        assert_eq!(validate_scope(&"a".repeat(256)), Ok(()));
    }

    #[test]
    fn client_ids() {
        assert!(is_valid_client_id("1example23456789"));
        assert!(is_valid_client_id("dev-client_x+y"));
        assert!(!is_valid_client_id(""));
        assert!(!is_valid_client_id("a b"));
        assert!(!is_valid_client_id(&"a".repeat(129)));
    }
}
