/* The UCX API surface prefixd binds. Regenerate with ucx-bindings/gen/generate.sh. */
#include <ucp/api/ucp.h>
#include <ucs/type/status.h>
