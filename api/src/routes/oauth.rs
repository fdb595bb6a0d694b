use jobs::accounts::connect::{ConnectError, complete_connect, fail_connect, start_connect};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::Query,
    payload::{Html, Json},
};
use secrecy::SecretString;

use crate::AppState;
use crate::auth::BearerAuth;
use crate::error::{ApiError, ApiResult};
use crate::routes::ApiTags;

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ConnectStart {
    /// Send the user's browser here to sign in with Microsoft.
    pub authorize_url: String,
}

#[derive(ApiResponse)]
pub enum ConnectResponse {
    /// The Microsoft sign-in URL.
    #[oai(status = 200)]
    Url(Json<ConnectStart>),
    /// Redirect straight to Microsoft (with `redirect=true`).
    #[oai(status = 302)]
    Redirect(#[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
pub enum CallbackResponse {
    /// The mailbox is connected.
    #[oai(status = 200)]
    Connected(Html<String>),
    /// The connection failed; the page says why and what to do.
    #[oai(status = 400)]
    Failed(Html<String>),
}

pub struct OAuthApi {
    pub state: AppState,
}

fn page(title: &str, message: &str) -> String {
    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;}}</style>\
         </head><body><h1>{t}</h1><p>{m}</p></body></html>",
        t = esc(title),
        m = esc(message)
    )
}

#[OpenApi(tag = "ApiTags::Accounts")]
impl OAuthApi {
    /// Starts connecting a Microsoft 365 mailbox (admin): returns the sign-in URL, or
    /// redirects to it with `redirect=true`. The state in it is single use and expires.
    #[oai(path = "/api/v1/oauth/connect", method = "get")]
    async fn connect(
        &self,
        auth: BearerAuth,
        /// Pre-fills the Microsoft sign-in with this address, and connects only this mailbox:
        /// a sign-in as anyone else is refused at the callback. Without it, whoever signs in
        /// is connected.
        login_hint: Query<Option<String>>,
        #[oai(default)] redirect: Query<bool>,
    ) -> ApiResult<ConnectResponse> {
        if !auth.0.at_least_admin() {
            return Err(ApiError::forbidden(
                "connecting mailboxes needs the admin role",
            ));
        }
        let login_hint = login_hint
            .0
            .as_deref()
            .map(jobs::ids::EmailAddress::parse)
            .transpose()
            .map_err(|_| ApiError::unprocessable("login_hint must be an email address"))?;
        let url = start_connect(
            &self.state.services,
            auth.0.tenant,
            &auth.0.subject,
            login_hint.as_ref(),
        )
        .await
        .map_err(|e| ApiError::internal(&e))?;
        Ok(if redirect.0 {
            ConnectResponse::Redirect(url.to_string())
        } else {
            ConnectResponse::Url(Json(ConnectStart {
                authorize_url: url.to_string(),
            }))
        })
    }

    /// Microsoft redirects the browser here after sign-in (public: the state authenticates
    /// it). Verifies the state, redeems the code, stores the account and its tokens, and
    /// queues a connection test and the first sync. A sign-in started for a specific mailbox
    /// (a reconnect, or `login_hint`) is refused when another mailbox signed in: nothing is
    /// stored, and the page names both addresses.
    #[oai(path = "/oauth/callback", method = "get")]
    async fn callback(
        &self,
        code: Query<Option<String>>,
        state: Query<Option<String>>,
        error: Query<Option<String>>,
        error_description: Query<Option<String>>,
    ) -> CallbackResponse {
        let services = &self.state.services;
        let result = match (error.0, code.0, state.0) {
            (Some(err), _, state) => Err(fail_connect(
                services,
                state.as_deref(),
                &err,
                error_description.0.as_deref(),
            )
            .await),
            (None, Some(code), Some(state)) => {
                complete_connect(services, &state, SecretString::from(code)).await
            }
            _ => Err(ConnectError::UnknownState),
        };
        match result {
            Ok(c) => CallbackResponse::Connected(Html(page(
                "Mailbox connected",
                &format!(
                    "{} is connected. graphdesk is testing the connection and syncing the inbox now; you can close this page.",
                    c.email
                ),
            ))),
            Err(e) => {
                let safe = match &e {
                    ConnectError::Db(_)
                    | ConnectError::Queue(_)
                    | ConnectError::Tokens(_)
                    | ConnectError::Vault(_) => {
                        tracing::error!(error = ?e, "connect failed");
                        "graphdesk could not store the connection; nothing was saved. Try again, and contact support with the request id if it keeps failing.".to_string()
                    }
                    ConnectError::WrongMailbox {
                        expected,
                        signed_in,
                    } => {
                        tracing::warn!(%expected, %signed_in, "connect refused: another mailbox signed in");
                        format!(
                            "This sign-in link was for {expected}, but {signed_in} signed in. \
                             Nothing was connected and no tokens were kept, and this link cannot be used again. \
                             To connect {expected}, start the connection again and sign in to Microsoft as {expected} \
                             (sign out of {signed_in} first, or use a private browser window). \
                             To connect {signed_in} instead, start a new connection without an address."
                        )
                    }
                    other => {
                        tracing::warn!(error = %other, "connect refused");
                        other.to_string()
                    }
                };
                CallbackResponse::Failed(Html(page(
                    "The mailbox was not connected",
                    &format!("{safe} (request id {})", crate::error::current_request_id()),
                )))
            }
        }
    }
}
