"""One `APIRouter` per resource; `service.app` assembles them."""
