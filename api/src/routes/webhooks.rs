//! Microsoft Graph's webhook endpoints (public: Graph cannot send a JWT; each notification is
//! authenticated by its subscription's clientState instead).
//!
//! Both answer Graph's validation handshake first: with `validationToken` in the query the
//! reply is the decoded token as text/plain, before the body is looked at. Otherwise the body
//! is a notification collection; every notification is checked against its subscription's
//! clientState, and the valid ones are persisted (a coalesced sync, lifecycle flags) before the
//! 202. A notification that fails the check is discarded and still answered 202, as Microsoft
//! recommends: a forged or stale notification gets no retry and learns nothing.

use jobs::webhooks::{NotificationBatch, accept};
use poem::{FromRequest, Request, RequestBody};
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::Type;
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Object, OpenApi,
    param::Query, payload::PlainText,
};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;

/// One change notification or lifecycle event, as Graph posts it (other fields are ignored).
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none, rename_all = "camelCase")]
pub struct ChangeNotification {
    pub subscription_id: String,
    /// The subscription's secret, echoed back by Graph.
    pub client_state: Option<String>,
    /// `created` for new mail.
    pub change_type: Option<String>,
    pub resource: Option<String>,
    /// On lifecycle events: `reauthorizationRequired`, `subscriptionRemoved` or `missed`.
    pub lifecycle_event: Option<String>,
    pub subscription_expiration_date_time: Option<String>,
    pub tenant_id: Option<String>,
}

/// The body Graph posts: one or more notifications.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ChangeNotificationCollection {
    pub value: Vec<ChangeNotification>,
}

/// The raw body, taken whatever its Content-Type (documented as the JSON Graph sends): the
/// validation request is an empty text/plain POST that must never meet a JSON parser.
pub struct RawBody(Vec<u8>);

impl<'a> ApiExtractor<'a> for RawBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <ChangeNotificationCollection as Type>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: Some("Absent on the validation request."),
            content: vec![MetaMediaType {
                content_type: "application/json",
                schema: <ChangeNotificationCollection as Type>::schema_ref(),
            }],
            required: false,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(Self(
            <Vec<u8> as FromRequest>::from_request(request, body).await?,
        ))
    }
}

#[derive(ApiResponse)]
pub enum WebhookResponse {
    /// The validation handshake: the URL-decoded `validationToken`, verbatim.
    #[oai(status = 200)]
    Validation(PlainText<String>),
    /// Persisted. Notifications with an unknown subscription or a wrong clientState were
    /// discarded.
    #[oai(status = 202)]
    Accepted,
}

pub struct WebhookApi {
    pub state: AppState,
}

impl WebhookApi {
    async fn receive(
        &self,
        validation_token: Option<String>,
        body: RawBody,
    ) -> ApiResult<WebhookResponse> {
        if let Some(token) = validation_token {
            return Ok(WebhookResponse::Validation(PlainText(token)));
        }
        let batch: NotificationBatch = serde_json::from_slice(&body.0).map_err(|_| {
            ApiError::bad_request("the body is not a Microsoft Graph notification collection")
        })?;
        // An error here is a 5xx, which asks Graph to deliver again later.
        // Notifications name a subscription, not a tenant: routing them is cross-tenant work.
        let accepted = accept(&self.state.services.system_pool, &batch)
            .await
            .map_err(|e| ApiError::internal(&e))?;
        tracing::debug!(
            verified = accepted.verified,
            rejected = accepted.rejected,
            syncs_created = accepted.syncs_created,
            "graph notifications accepted"
        );
        Ok(WebhookResponse::Accepted)
    }
}

#[OpenApi(tag = "ApiTags::Webhooks")]
impl WebhookApi {
    /// Microsoft Graph change notifications (public). New mail wakes one coalesced delta sync
    /// of the mailbox; answers 202 once that is stored.
    #[oai(path = "/graph/notifications", method = "post")]
    async fn notifications(
        &self,
        /// Sent by Graph when a subscription is created; echoed back as text/plain.
        #[oai(name = "validationToken")]
        validation_token: Query<Option<String>>,
        body: RawBody,
    ) -> ApiResult<WebhookResponse> {
        self.receive(validation_token.0, body).await
    }

    /// Microsoft Graph lifecycle events (public): `reauthorizationRequired` renews the
    /// subscription, `subscriptionRemoved` recreates it and syncs, `missed` syncs.
    #[oai(path = "/graph/lifecycle", method = "post")]
    async fn lifecycle(
        &self,
        /// Sent by Graph when a subscription is created; echoed back as text/plain.
        #[oai(name = "validationToken")]
        validation_token: Query<Option<String>>,
        body: RawBody,
    ) -> ApiResult<WebhookResponse> {
        self.receive(validation_token.0, body).await
    }
}
