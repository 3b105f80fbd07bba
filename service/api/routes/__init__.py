"""One `APIRouter` per resource; `service.api.app` assembles them."""
