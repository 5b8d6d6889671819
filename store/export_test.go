package store

// TranslateForTest exposes translate to the external tests.
var TranslateForTest = translate
