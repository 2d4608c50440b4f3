//! The ElastiCache / MemoryDB IAM authentication token: a SigV4-presigned
//! `connect` request for the cache, valid 15 minutes, exactly as AWS's
//! documentation makes it in Python with botocore (checked against it). The
//! credential chain that feeds it is in `iam` (cargo feature `aws`).
// Built and tested in every gateway build (the tests compare it with botocore);
// only the `aws` feature's credential chain calls it.
#![cfg_attr(not(feature = "aws"), allow(dead_code))]

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign},
    sign::v4,
};
use secrecy::SecretString;

use super::target::{IamTarget, LinkError};

/// How long a token is valid (AWS: 15 minutes).
const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// The token request of AWS's documentation, for one cache and user.
#[derive(Debug, Clone)]
pub(crate) struct TokenRequest<'a> {
    pub(crate) target: &'a IamTarget,
    pub(crate) region: &'a str,
}

impl TokenRequest<'_> {
    /// The token: `<cache>/?Action=connect&User=<user>[&ResourceType=ServerlessCache]`
    /// presigned for `expires_in` 900 s at `at`, without the scheme.
    pub(crate) fn presign(
        &self,
        credentials: &Credentials,
        at: SystemTime,
    ) -> Result<SecretString, LinkError> {
        let fail = |e: &dyn std::fmt::Display| LinkError::Setup(format!("IAM token: {e}"));
        let mut url = url::Url::parse(&format!("https://{}/", self.target.cache_name))
            .map_err(|e| fail(&e))?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("Action", "connect");
            query.append_pair("User", &self.target.user);
            if self.target.serverless {
                query.append_pair("ResourceType", "ServerlessCache");
            }
        }
        let identity = credentials.clone().into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(TOKEN_LIFETIME);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(self.region)
            .name(self.target.service.signing_name())
            .time(at)
            .settings(settings)
            .build()
            .map_err(|e| fail(&e))?
            .into();
        let signable = SignableRequest::new(
            "GET",
            url.as_str(),
            std::iter::empty(),
            SignableBody::Bytes(&[]),
        )
        .map_err(|e| fail(&e))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| fail(&e))?.into_parts();
        let mut request = http::Request::builder()
            .method("GET")
            .uri(url.as_str())
            .body(())
            .map_err(|e| fail(&e))?;
        instructions.apply_to_request_http1x(&mut request);
        let signed = request.uri().to_string();
        Ok(SecretString::from(
            signed
                .strip_prefix("https://")
                .unwrap_or(&signed)
                .to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;
    use crate::broker::target::IamService;

    fn target(serverless: bool, service: IamService) -> IamTarget {
        IamTarget {
            user: "m2m-gateway".into(),
            cache_name: "my-cache".into(),
            serverless,
            service,
            region: None,
        }
    }

    /// The same token as AWS's documented Python (botocore's RequestSigner),
    /// from fixed credentials at a fixed time.
    fn botocore(target: &IamTarget, session_token: Option<&str>) -> Option<String> {
        let script = format!(
            r#"
import datetime, botocore.auth, botocore.session
from botocore.model import ServiceId
from botocore.signers import RequestSigner
from urllib.parse import urlencode, urlunparse, ParseResult
botocore.auth.get_current_datetime = lambda: datetime.datetime(2026, 12, 6, 10, 52, 6)
session = botocore.session.get_session()
session.set_credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", {token})
signer = RequestSigner(ServiceId("{service}"), "us-east-1", "{service}", "v4",
                       session.get_credentials(), session.get_component("event_emitter"))
query = {{"Action": "connect", "User": "m2m-gateway"}}
if {serverless}:
    query["ResourceType"] = "ServerlessCache"
url = urlunparse(ParseResult(scheme="https", netloc="my-cache", path="/",
                             query=urlencode(query), params="", fragment=""))
signed = signer.generate_presigned_url(
    {{"method": "GET", "url": url, "body": {{}}, "headers": {{}}, "context": {{}}}},
    operation_name="connect", expires_in=900, region_name="us-east-1")
print(signed.removeprefix("https://"))
"#,
            service = target.service.signing_name(),
            serverless = if target.serverless { "True" } else { "False" },
            token = session_token.map_or("None".to_owned(), |t| format!("{t:?}")),
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .ok()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let install = "python3 -m pip install botocore";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "botocore is missing ({install}): {err}"
            );
            eprintln!("SKIPPING: botocore is missing ({install}): {err}");
            return None;
        }
        Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }

    fn query(token: &str) -> std::collections::BTreeMap<String, String> {
        url::Url::parse(&format!("https://{token}"))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn tokens_match_botocore_for_elasticache_serverless_and_memorydb() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_554_326); // 2026-12-06T10:52:06Z
        for (t, session) in [
            (target(false, IamService::Elasticache), None),
            (
                target(true, IamService::Elasticache),
                Some("session-token/with+odd=chars"),
            ),
            (target(false, IamService::Memorydb), None),
        ] {
            let Some(reference) = botocore(&t, session) else {
                return;
            };
            let credentials = Credentials::new(
                "AKIDEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                session.map(str::to_owned),
                None,
                "test",
            );
            let ours = TokenRequest {
                target: &t,
                region: "us-east-1",
            }
            .presign(&credentials, at)
            .unwrap();
            let ours = ours.expose_secret();
            assert!(ours.starts_with("my-cache/?"), "{ours}");
            assert_eq!(
                query(ours),
                query(&reference),
                "\nours:     {ours}\nbotocore: {reference}"
            );
            assert_eq!(query(ours)["X-Amz-Expires"], "900");
        }
    }
}
