//! Cognito naming rules: Regions, user pool ids, pool names, the two issuer
//! forms and where each issuer publishes its keys. One implementation for the
//! configuration (`[cognito]`, `[[pools]]`), the validator builder
//! (`CognitoPool`) and the emulator; [`PoolError::key`] lets the configuration
//! name the key a mistake concerns.

/// The name of the pool of `[cognito]` (and of a validator pool given no name).
pub const DEFAULT_POOL: &str = "default";

/// Which form of issuer a user pool has (its `IssuerConfigurationType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerType {
    /// `https://cognito-idp.<region>.amazonaws.com/<poolId>` (pools created
    /// before 2026, unless switched).
    #[default]
    Original,
    /// `https://issuer-cognito-idp.<region>.amazonaws.com/<poolId>`: recommended
    /// for every pool and required for multi-Region replication; `<region>` is
    /// the pool's primary Region.
    Updated,
}

impl IssuerType {
    /// The issuer of `user_pool_id` in `region` in this form.
    pub fn issuer(self, region: &str, user_pool_id: &str) -> String {
        match self {
            IssuerType::Original => {
                format!("https://cognito-idp.{region}.amazonaws.com/{user_pool_id}")
            }
            IssuerType::Updated => {
                format!("https://issuer-cognito-idp.{region}.amazonaws.com/{user_pool_id}")
            }
        }
    }

    /// The other form (what a pool switching issuers issued before, or will).
    pub fn other(self) -> Self {
        match self {
            IssuerType::Original => IssuerType::Updated,
            IssuerType::Updated => IssuerType::Original,
        }
    }
}

/// The JWKS URI Cognito serves for `issuer`: `<issuer>/.well-known/jwks.json`.
pub fn jwks_uri_of(issuer: &str) -> String {
    format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/'))
}

/// An AWS Region name (`us-east-1`): lowercase letters, digits and `-`.
pub fn is_region(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A user pool id (`us-east-1_AbCdEf123`): a Region, `_`, 1-64 letters or digits.
pub fn is_pool_id(s: &str) -> bool {
    match s.split_once('_') {
        Some((region, id)) => {
            is_region(region)
                && !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric())
        }
        None => false,
    }
}

/// The Region a user pool id names (`us-east-1` of `us-east-1_AbCdEf123`).
pub fn region_of_pool_id(user_pool_id: &str) -> Option<&str> {
    is_pool_id(user_pool_id)
        .then(|| user_pool_id.split_once('_').map(|(r, _)| r))
        .flatten()
}

/// A pool's name in `[[clients]] pool`, metrics and logs: 1-64 characters of
/// `[A-Za-z0-9_.-]`.
pub fn is_pool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// What a pool's issuers are derived from: the configuration's `[cognito]`
/// keys, or a `CognitoPool` built in code.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolSpec<'a> {
    /// `region`.
    pub region: Option<&'a str>,
    /// `user_pool_id`.
    pub user_pool_id: Option<&'a str>,
    /// `issuer_type`.
    pub issuer_type: IssuerType,
    /// An explicit issuer (instead of the derived one).
    pub issuer: Option<&'a str>,
    /// An explicit JWKS URI for the issuer.
    pub jwks_uri: Option<&'a str>,
    /// Also accept the pool's other issuer form.
    pub accept_other_form: bool,
    /// Also accept these issuers.
    pub accept_issuers: &'a [String],
}

/// A pool's issuers, each with the URI of its key set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolIssuers {
    /// The pool's own issuer.
    pub issuer: String,
    /// Its JWKS URI.
    pub jwks_uri: String,
    /// The other issuers accepted (a previous form), each with its JWKS URI.
    pub previous: Vec<(String, String)>,
}

/// Why a pool's issuers cannot be derived. [`PoolError::key`] names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No Region (and no explicit issuer).
    #[error("region is not set (e.g. \"us-east-1\")")]
    MissingRegion,
    /// No user pool id (and no explicit issuer).
    #[error("user_pool_id is not set (e.g. \"us-east-1_AbCdEf123\")")]
    MissingUserPoolId,
    /// Not an AWS Region name.
    #[error("{0:?} is not an AWS Region such as us-east-1")]
    BadRegion(String),
    /// Not a user pool id.
    #[error("{0:?} is not a user pool id such as us-east-1_AbCdEf123")]
    BadUserPoolId(String),
    /// The pool id names another Region: the derived issuer would refuse every
    /// token.
    #[error(
        "{region:?} is not the Region of user pool {pool:?} (its id starts with {pool_region:?}); the derived issuer would refuse every token"
    )]
    RegionMismatch {
        /// The Region given.
        region: String,
        /// The pool id given.
        pool: String,
        /// The Region the pool id names.
        pool_region: String,
    },
    /// The other issuer form asked for with an explicit issuer: it cannot be
    /// derived.
    #[error(
        "the previous issuer form is derived from region and user_pool_id, but the issuer is set by hand: name the previous issuer itself"
    )]
    PreviousIssuerUnknown,
    /// An accepted issuer given twice, or equal to the pool's own.
    #[error("{0:?} is listed twice (or is the pool's own issuer)")]
    IssuerListedTwice(String),
}

impl PoolError {
    /// The key the error concerns (`region`, `user_pool_id`,
    /// `accept_previous_issuer`).
    pub fn key(&self) -> &'static str {
        match self {
            PoolError::MissingRegion
            | PoolError::BadRegion(_)
            | PoolError::RegionMismatch { .. } => "region",
            PoolError::MissingUserPoolId | PoolError::BadUserPoolId(_) => "user_pool_id",
            PoolError::PreviousIssuerUnknown | PoolError::IssuerListedTwice(_) => {
                "accept_previous_issuer"
            }
        }
    }
}

impl PoolSpec<'_> {
    /// Checks the Region and pool id (whenever given) and derives every issuer
    /// the pool's tokens may carry, its own first. URLs are not parsed here:
    /// callers check them as their transport rules require.
    pub fn issuers(&self) -> Result<PoolIssuers, PoolError> {
        if let Some(region) = self.region {
            if !is_region(region) {
                return Err(PoolError::BadRegion(region.to_owned()));
            }
        }
        if let Some(pool) = self.user_pool_id {
            if !is_pool_id(pool) {
                return Err(PoolError::BadUserPoolId(pool.to_owned()));
            }
        }
        let issuer = match self.issuer {
            Some(issuer) => issuer.to_owned(),
            None => {
                let (region, pool) = self.region_and_pool()?;
                self.issuer_type.issuer(region, pool)
            }
        };
        let jwks_uri = self
            .jwks_uri
            .map_or_else(|| jwks_uri_of(&issuer), str::to_owned);
        let mut wanted: Vec<String> = Vec::new();
        if self.accept_other_form {
            if self.issuer.is_some() {
                return Err(PoolError::PreviousIssuerUnknown);
            }
            let (region, pool) = self.region_and_pool()?;
            wanted.push(self.issuer_type.other().issuer(region, pool));
        }
        wanted.extend(self.accept_issuers.iter().cloned());
        let mut previous: Vec<(String, String)> = Vec::with_capacity(wanted.len());
        for other in wanted {
            if other == issuer || previous.iter().any(|(p, _)| *p == other) {
                return Err(PoolError::IssuerListedTwice(other));
            }
            let jwks = jwks_uri_of(&other);
            previous.push((other, jwks));
        }
        Ok(PoolIssuers {
            issuer,
            jwks_uri,
            previous,
        })
    }

    fn region_and_pool(&self) -> Result<(&str, &str), PoolError> {
        let region = self.region.ok_or(PoolError::MissingRegion)?;
        let pool = self.user_pool_id.ok_or(PoolError::MissingUserPoolId)?;
        match region_of_pool_id(pool) {
            Some(pool_region) if pool_region == region => Ok((region, pool)),
            pool_region => Err(PoolError::RegionMismatch {
                region: region.to_owned(),
                pool: pool.to_owned(),
                pool_region: pool_region.unwrap_or_default().to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(region: &'a str, pool: &'a str) -> PoolSpec<'a> {
        PoolSpec {
            region: Some(region),
            user_pool_id: Some(pool),
            ..PoolSpec::default()
        }
    }

    #[test]
    fn derives_both_forms_and_their_keys() {
        let p = spec("us-east-1", "us-east-1_AbC").issuers().unwrap();
        assert_eq!(
            p.issuer,
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC"
        );
        assert_eq!(
            p.jwks_uri,
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC/.well-known/jwks.json"
        );
        let p = PoolSpec {
            issuer_type: IssuerType::Updated,
            accept_other_form: true,
            ..spec("us-east-1", "us-east-1_AbC")
        }
        .issuers()
        .unwrap();
        assert_eq!(
            p.issuer,
            "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC"
        );
        assert_eq!(
            p.previous,
            [(
                "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC".to_owned(),
                "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC/.well-known/jwks.json"
                    .to_owned()
            )]
        );
    }

    /// The configuration refused a previous issuer listed twice while the
    /// validator builder dropped it silently: both now refuse it, here.
    #[test]
    fn a_previous_issuer_listed_twice_is_refused() {
        let twice = [
            "https://idp.example.com/old".to_owned(),
            "https://idp.example.com/old".to_owned(),
        ];
        let err = PoolSpec {
            accept_issuers: &twice,
            ..spec("us-east-1", "us-east-1_AbC")
        }
        .issuers()
        .unwrap_err();
        assert_eq!(
            err,
            PoolError::IssuerListedTwice("https://idp.example.com/old".into())
        );
        assert_eq!(err.key(), "accept_previous_issuer");
        // The other form given by hand as well as by `accept_other_form`.
        let other = ["https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC".to_owned()];
        let err = PoolSpec {
            accept_other_form: true,
            accept_issuers: &other,
            ..spec("us-east-1", "us-east-1_AbC")
        }
        .issuers()
        .unwrap_err();
        assert!(matches!(err, PoolError::IssuerListedTwice(_)));
        // The pool's own issuer.
        let own = ["https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC".to_owned()];
        assert!(matches!(
            PoolSpec {
                accept_issuers: &own,
                ..spec("us-east-1", "us-east-1_AbC")
            }
            .issuers(),
            Err(PoolError::IssuerListedTwice(_))
        ));
    }

    /// The configuration compared the Region with `split('_')`, the builder with
    /// `starts_with`: one rule now, the Region the pool id names.
    #[test]
    fn the_region_is_the_one_the_pool_id_names() {
        for (region, pool) in [
            ("us-east", "us-east-1_AbC"),
            ("us-east-1", "us-east-12_AbC"),
            ("eu-west-1", "us-east-1_AbC"),
        ] {
            let err = spec(region, pool).issuers().unwrap_err();
            assert!(
                matches!(&err, PoolError::RegionMismatch { pool_region, .. } if pool_region == pool.split_once('_').unwrap().0),
                "{region} {pool}: {err}"
            );
            assert_eq!(err.key(), "region");
        }
        assert!(spec("us-east-1", "us-east-1_AbC").issuers().is_ok());
        // Shapes are checked whenever given, even with an explicit issuer.
        let hand = PoolSpec {
            issuer: Some("https://idp.example.com/p"),
            ..spec("US-EAST-1", "us-east-1_AbC")
        };
        assert_eq!(
            hand.issuers().unwrap_err(),
            PoolError::BadRegion("US-EAST-1".into())
        );
        let err = spec("us-east-1", "pool").issuers().unwrap_err();
        assert_eq!(err, PoolError::BadUserPoolId("pool".into()));
        assert_eq!(err.key(), "user_pool_id");
        // An explicit issuer needs neither.
        let only = PoolSpec {
            issuer: Some("https://idp.example.com/p"),
            ..PoolSpec::default()
        };
        assert_eq!(only.issuers().unwrap().issuer, "https://idp.example.com/p");
        assert_eq!(
            PoolSpec {
                accept_other_form: true,
                ..only
            }
            .issuers()
            .unwrap_err(),
            PoolError::PreviousIssuerUnknown
        );
    }

    #[test]
    fn shapes() {
        assert!(is_region("ap-southeast-2"));
        assert!(!is_region(""));
        assert!(!is_region("us_east"));
        assert!(is_pool_id("us-east-1_AbCdEf123"));
        assert!(!is_pool_id("us-east-1_"));
        assert!(!is_pool_id("us-east-1_a_b"));
        assert_eq!(region_of_pool_id("eu-west-1_X"), Some("eu-west-1"));
        assert_eq!(region_of_pool_id("nope"), None);
        assert!(is_pool_name("orders.prod-1"));
        assert!(!is_pool_name("a b"));
        assert_eq!(
            jwks_uri_of("http://127.0.0.1:9229/p/"),
            "http://127.0.0.1:9229/p/.well-known/jwks.json"
        );
    }
}
