//! The demo `m2m.demo.v1.Echo` service used by the protected-server example, the
//! tests and the load generator. It answers with the caller's verified client id.

use tonic::{Request, Response, Status};

use crate::proto::demo::v1::{EchoReply, EchoRequest, echo_server::Echo};

/// Echoes the message and the `client_id` of the verified [`crate::jwt::Claims`]
/// (empty when the method is public or unprotected).
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let client_id = crate::auth::claims(&request)
            .map(|c| c.client_id().to_owned())
            .unwrap_or_default();
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            client_id,
        }))
    }
}
