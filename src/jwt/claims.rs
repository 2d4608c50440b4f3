//! Verified claims, stored compactly (a verified-token cache holds 100,000 of
//! them), and the strict one-pass parse of a token payload.

use std::{
    borrow::Cow,
    fmt,
    sync::{Arc, OnceLock},
};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, Visitor},
};
use serde_json::{Map, Value, value::RawValue};

use super::{Invalid, Rejection, truncate};
use crate::proto::{SharedClaims, gateway::v1 as pb};

/// A JSON string, borrowed from the input unless it had escapes.
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl Text<'_> {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The registered claims of a payload, typed strictly (a present claim of the wrong
/// JSON type, `null` included, fails the parse; a registered claim given twice
/// fails too), and every other claim kept as JSON text.
pub(crate) struct Payload<'a> {
    pub(crate) iss: Option<Text<'a>>,
    pub(crate) sub: Option<Text<'a>>,
    pub(crate) token_use: Option<Text<'a>>,
    pub(crate) client_id: Option<Text<'a>>,
    pub(crate) scope: Option<Text<'a>>,
    pub(crate) jti: Option<Text<'a>>,
    pub(crate) exp: Option<i64>,
    pub(crate) nbf: Option<i64>,
    pub(crate) iat: Option<i64>,
    /// `"name":value` pairs of the other claims, comma-separated.
    pub(crate) extra: String,
}

impl<'de> Deserialize<'de> for Payload<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Payload<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of claims")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut p = Payload {
                    iss: None,
                    sub: None,
                    token_use: None,
                    client_id: None,
                    scope: None,
                    jti: None,
                    exp: None,
                    nbf: None,
                    iat: None,
                    extra: String::new(),
                };
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    let raw: &'de RawValue = map.next_value()?;
                    let text = |slot: &mut Option<Text<'de>>| -> Result<(), A::Error> {
                        if slot.is_some() {
                            return Err(de::Error::custom("duplicate claim"));
                        }
                        *slot = Some(serde_json::from_str(raw.get()).map_err(de::Error::custom)?);
                        Ok(())
                    };
                    let int = |slot: &mut Option<i64>| -> Result<(), A::Error> {
                        if slot.is_some() {
                            return Err(de::Error::custom("duplicate claim"));
                        }
                        *slot = Some(serde_json::from_str(raw.get()).map_err(de::Error::custom)?);
                        Ok(())
                    };
                    match key.as_str() {
                        "iss" => text(&mut p.iss)?,
                        "sub" => text(&mut p.sub)?,
                        "token_use" => text(&mut p.token_use)?,
                        "client_id" => text(&mut p.client_id)?,
                        "scope" => text(&mut p.scope)?,
                        "jti" => text(&mut p.jti)?,
                        "exp" => int(&mut p.exp)?,
                        "nbf" => int(&mut p.nbf)?,
                        "iat" => int(&mut p.iat)?,
                        other => {
                            if !p.extra.is_empty() {
                                p.extra.push(',');
                            }
                            p.extra.push_str(
                                &serde_json::to_string(other).map_err(de::Error::custom)?,
                            );
                            p.extra.push(':');
                            p.extra.push_str(raw.get());
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Subject {
    Absent,
    SameAsClient,
    Other(Box<str>),
}

/// The verified claims of an access token.
///
/// Kept compact: a handful of boxed strings, the issuer shared with the validator,
/// and any other claims as one JSON text parsed only when [`Claims::all`] is asked.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims {
    /// The proto form, built on first use: the verified-token cache hands out the
    /// same `Arc<Claims>` for a token, so Validate converts its claims (and parses
    /// `all`) once per token, not per call.
    proto: ProtoMemo,
    /// [`Claims::custom`]'s memo: the adopter's claims type, deserialised once.
    custom: CustomMemo,
    client_id: Box<str>,
    subject: Subject,
    issuer: Arc<str>,
    scope: Option<Box<str>>,
    jti: Option<Box<str>>,
    issued_at: Option<i64>,
    expires_at: i64,
    not_before: Option<i64>,
    extra: Option<Box<str>>,
}

/// [`Claims::to_proto`]'s memo; ignored by comparisons (it is derived).
#[derive(Clone, Default)]
struct ProtoMemo(OnceLock<SharedClaims>);

impl PartialEq for ProtoMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ProtoMemo {}

/// [`Claims::custom`]'s memo; ignored by comparisons (it is derived).
#[derive(Clone, Default)]
struct CustomMemo(OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl PartialEq for CustomMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CustomMemo {}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("client_id", &self.client_id())
            .field("subject", &self.subject())
            .field("issuer", &self.issuer())
            .field("scope", &self.scope)
            .field("jti", &self.jti())
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

fn boxed(t: &Option<Text<'_>>) -> Option<Box<str>> {
    t.as_ref().map(|t| t.as_str().into())
}

impl Claims {
    /// The checks that depend on the moment and the call, made on every use of
    /// verified claims, fresh or remembered, local or from the gateway: `exp`
    /// (and `nbf` when given) at `now` with `leeway` seconds, then the scopes
    /// the call requires.
    pub fn check_use(
        &self,
        now: i64,
        leeway: i64,
        nbf: Option<i64>,
        required_scopes: &[String],
    ) -> Result<(), Invalid> {
        if self.expires_at().saturating_add(leeway) <= now {
            return Err(Invalid::new(Rejection::Expired, "token has expired"));
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(Invalid::new(
                Rejection::NotYetValid,
                "token is not valid yet (nbf)",
            ));
        }
        if let Some(missing) = required_scopes.iter().find(|r| !self.has_scope(r)) {
            return Err(Invalid::new(
                Rejection::InsufficientScope,
                format!("scope {:?} not granted", truncate(missing)),
            ));
        }
        Ok(())
    }
}

impl Claims {
    /// From a parsed payload with `exp` and `client_id` present.
    pub(crate) fn from_payload(
        p: &Payload<'_>,
        client_id: &str,
        expires_at: i64,
        issuer: Arc<str>,
    ) -> Self {
        let subject = match p.sub.as_ref().map(Text::as_str) {
            None => Subject::Absent,
            Some(s) if s == client_id => Subject::SameAsClient,
            Some(s) => Subject::Other(s.into()),
        };
        Self {
            proto: ProtoMemo::default(),
            custom: CustomMemo::default(),
            client_id: client_id.into(),
            subject,
            issuer,
            scope: boxed(&p.scope),
            jti: boxed(&p.jti),
            issued_at: p.iat,
            expires_at,
            not_before: p.nbf,
            extra: (!p.extra.is_empty()).then(|| format!("{{{}}}", p.extra).into()),
        }
    }

    /// Claims received from a trusted verifier (the gateway's Validate RPC): the
    /// named fields, and `all` for everything (custom claims included).
    pub fn from_verified(
        client_id: &str,
        subject: &str,
        issuer: &str,
        expires_at: i64,
        all: &Map<String, Value>,
    ) -> Self {
        let text = |name: &str| all.get(name).and_then(Value::as_str).map(Box::<str>::from);
        let int = |name: &str| all.get(name).and_then(Value::as_i64);
        let extra: Map<String, Value> = all
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "iss"
                        | "sub"
                        | "token_use"
                        | "client_id"
                        | "scope"
                        | "jti"
                        | "exp"
                        | "nbf"
                        | "iat"
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self {
            proto: ProtoMemo::default(),
            custom: CustomMemo::default(),
            client_id: client_id.into(),
            subject: match subject {
                "" => Subject::Absent,
                s if s == client_id => Subject::SameAsClient,
                s => Subject::Other(s.into()),
            },
            issuer: issuer.into(),
            scope: text("scope"),
            jti: text("jti"),
            issued_at: int("iat"),
            expires_at,
            not_before: int("nbf"),
            extra: (!extra.is_empty())
                .then(|| serde_json::to_string(&extra).unwrap_or_default().into()),
        }
    }

    /// `client_id`.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// `sub` (empty when absent).
    pub fn subject(&self) -> &str {
        match &self.subject {
            Subject::Absent => "",
            Subject::SameAsClient => &self.client_id,
            Subject::Other(s) => s,
        }
    }

    /// `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The scopes of the `scope` claim.
    pub fn scopes(&self) -> impl Iterator<Item = &str> + '_ {
        self.scope
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty())
    }

    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }

    /// `token_use`: always `access` for a verified token.
    pub fn token_use(&self) -> &str {
        "access"
    }

    /// `jti` (empty when absent).
    pub fn jti(&self) -> &str {
        self.jti.as_deref().unwrap_or("")
    }

    /// `iat`, unix seconds (0 when absent).
    pub fn issued_at(&self) -> i64 {
        self.issued_at.unwrap_or(0)
    }

    /// `exp`, unix seconds.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// Every claim, custom ones included.
    pub fn all(&self) -> Map<String, Value> {
        let mut all: Map<String, Value> = self
            .extra
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or_default();
        all.insert("iss".into(), self.issuer().into());
        all.insert("token_use".into(), "access".into());
        all.insert("client_id".into(), self.client_id().into());
        all.insert("exp".into(), self.expires_at.into());
        if !matches!(self.subject, Subject::Absent) {
            all.insert("sub".into(), self.subject().into());
        }
        if let Some(scope) = &self.scope {
            all.insert("scope".into(), scope.as_ref().into());
        }
        if let Some(jti) = &self.jti {
            all.insert("jti".into(), jti.as_ref().into());
        }
        if let Some(iat) = self.issued_at {
            all.insert("iat".into(), iat.into());
        }
        if let Some(nbf) = self.not_before {
            all.insert("nbf".into(), nbf.into());
        }
        all
    }
}

impl Claims {
    /// The claims as your own type `T` (custom claims such as a `tenant` added
    /// by Cognito's pre token generation trigger, next to the standard ones),
    /// deserialised from [`Claims::all`] once per verified token: the validator
    /// hands out the same claims for every use of a token, so later calls get
    /// the same `Arc<T>`. A second type asked of the same claims is
    /// deserialised each time.
    ///
    /// ```
    /// # fn demo(claims: &m2m_gateway::jwt::Claims) -> Result<(), serde_json::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Tenant {
    ///     tenant: String,
    ///     client_id: String,
    /// }
    /// let tenant = claims.custom::<Tenant>()?;
    /// println!("{} calls for {}", tenant.client_id, tenant.tenant);
    /// # Ok(()) }
    /// ```
    pub fn custom<T>(&self) -> Result<Arc<T>, serde_json::Error>
    where
        T: serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        if let Some(memo) = self.custom.0.get() {
            if let Ok(typed) = Arc::clone(memo).downcast::<T>() {
                return Ok(typed);
            }
            return serde_json::from_value::<T>(Value::Object(self.all())).map(Arc::new);
        }
        let typed = Arc::new(serde_json::from_value::<T>(Value::Object(self.all()))?);
        let _ = self.custom.0.set(typed.clone());
        Ok(typed)
    }

    /// The claims as Validate answers them (`all` as a `Struct`), built once per
    /// verified token and shared by every answer (encoded once, too).
    pub fn to_proto(&self) -> SharedClaims {
        self.proto.0.get_or_init(|| proto_of(self).into()).clone()
    }
}

fn proto_of(c: &Claims) -> pb::Claims {
    pb::Claims {
        client_id: c.client_id().to_owned(),
        subject: c.subject().to_owned(),
        issuer: c.issuer().to_owned(),
        scopes: c.scopes().map(str::to_owned).collect(),
        token_use: c.token_use().to_owned(),
        jti: c.jti().to_owned(),
        issued_at: c.issued_at(),
        expires_at: c.expires_at(),
        all: Some(json_object_to_struct(c.all())),
    }
}

fn json_object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: &Value) -> Result<(Claims, Map<String, Value>), String> {
        let text = v.to_string();
        let p: Payload<'_> = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let c = Claims::from_payload(
            &p,
            p.client_id.as_ref().unwrap().as_str(),
            p.exp.unwrap(),
            "iss-x".into(),
        );
        Ok((c, v.as_object().unwrap().clone()))
    }

    #[test]
    fn all_reproduces_every_claim() {
        let v = json!({
            "sub": "c", "token_use": "access", "scope": "a/b c/d", "auth_time": 1, "iss": "iss-x",
            "exp": 10, "iat": 2, "nbf": 1, "version": 2, "jti": "j", "client_id": "c",
            "custom": {"nested": [1, "two", null]}, "esc\"aped": "va\\lue"
        });
        let (c, want) = parse(&v).unwrap();
        assert_eq!(c.all(), want);
        assert_eq!(c.subject(), "c");
        assert_eq!(c.scopes().collect::<Vec<_>>(), vec!["a/b", "c/d"]);
        let round = Claims::from_verified(
            c.client_id(),
            c.subject(),
            c.issuer(),
            c.expires_at(),
            &c.all(),
        );
        assert_eq!(round, c);
    }

    #[test]
    fn wrong_types_and_duplicates_fail() {
        for bad in [
            r#"{"exp": "1"}"#,
            r#"{"exp": 1.5}"#,
            r#"{"iss": null}"#,
            r#"{"scope": ["a"]}"#,
            r#"{"exp": 1, "exp": 2}"#,
            r#"{"client_id": "a", "client_id": "b"}"#,
        ] {
            assert!(serde_json::from_str::<Payload<'_>>(bad).is_err(), "{bad}");
        }
        let escaped: Payload<'_> = serde_json::from_str(r#"{"iss": "https:\/\/x"}"#).unwrap();
        assert_eq!(escaped.iss.unwrap().as_str(), "https://x");
    }
}
