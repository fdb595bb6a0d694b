use poem_openapi::{ApiResponse, Object, OpenApi, payload::Json};

use crate::AppState;
use crate::routes::ApiTags;

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ReadinessView {
    pub ready: bool,
    pub database: bool,
    pub migrations_current: bool,
    pub pending_migrations: Vec<i64>,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Database reachable and migrations current.
    #[oai(status = 200)]
    Ready(Json<ReadinessView>),
    /// Not ready: see the fields for why.
    #[oai(status = 503)]
    NotReady(Json<ReadinessView>),
}

pub struct HealthApi {
    pub state: AppState,
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness: the process is up.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness: the database answers and every migration is applied.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> ReadyResponse {
        let r = jobs::db::readiness(&self.state.pool).await;
        let view = ReadinessView {
            ready: r.ready(),
            database: r.database,
            migrations_current: r.migrations_current,
            pending_migrations: r.pending_migrations,
        };
        if view.ready {
            ReadyResponse::Ready(Json(view))
        } else {
            ReadyResponse::NotReady(Json(view))
        }
    }
}
